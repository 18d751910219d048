"""The demo model repository: the models ``genserve demo`` builds when they are absent.

Each entry goes through the same registry and pipeline as ``genserve train``; a model already
in the repository (any published version) is left as it is, so re-running the demo is instant
and never overwrites anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from serving.repository.layout import version_numbers
from training.pipeline import train_and_publish

# name -> (family, dataset, hyper-parameters)
DEMO_MODELS: dict[str, tuple[str, str, dict]] = {
    "digits-gaussian": ("gaussian", "digits", {}),
    "digits-kde": ("kde", "digits", {"kernel": "gaussian", "bandwidth": "cv"}),
    "digits-knn": ("knn", "digits", {"k": 5}),
    "digits-gmm": ("gmm", "digits", {"n_components": "auto", "covariance_type": "auto"}),
    "grid25-histogram": ("histogram", "grid25", {"bins": "auto"}),
    "grid25-kde": ("kde", "grid25", {"kernel": "gaussian", "bandwidth": "cv"}),
    "regimes-hmm": ("hmm", "regimes", {"n_states": "auto"}),
    # class-conditional ("give me sevens"); its score still marginalises over the classes
    "digits-vae": ("vae", "digits", {"conditional": True, "max_epochs": 100}),
    # MADE, 8 orderings, mixture-of-Gaussian conditionals on logit-transformed pixels (~85 nats)
    "digits-fvbn": ("fvbn", "digits", {}),
    # thin <-> bold digits (C1); lighter than the benchmark recipe: 32 channels, 40 epochs at 3e-3
    "digits-cyclegan": ("cyclegan", "digits-bold", {"width": 32, "epochs": 40, "decay_epochs": 20,
                                                    "learning_rate": 3e-3}),
    # the G1 recipe as it is (PacGAN4, coarse-to-fine Fourier discriminator, tanh generator, IMLE
    # coverage term, resampling of 16 candidates by a per-sample classifier): on the demo's 2,000
    # rows half its steps left 24 of 25 modes, all of them gave 25 (98.96 % high-quality)
    "grid25-gan": ("gan", "grid25", {}),
}


def build_demo_repository(repo: Path, log: Callable[[str], None] = print) -> list[str]:
    """Train and publish every demo model missing from ``repo``; return the names built."""
    repo = Path(repo)
    missing = [name for name in DEMO_MODELS if not version_numbers(repo / name)]
    if not missing:
        log(f"demo repository {repo} is complete ({len(DEMO_MODELS)} models)")
        return []
    log(f"building {len(missing)} of {len(DEMO_MODELS)} demo models into {repo}")
    for index, name in enumerate(missing, 1):
        family, data, params = DEMO_MODELS[name]
        log(f"=== [{index}/{len(missing)}] {name}")
        train_and_publish(family, data, repo, name, params, log=log)
    return missing
