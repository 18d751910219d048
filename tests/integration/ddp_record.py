"""``genserve`` with a recorder, for ``test_torchrun_ddp``: run by torchrun in place of
``-m genserve`` (``genserve/__main__.py`` is exactly ``main()``), it wraps the ``fit_dataset``
and ``evaluate`` of the family named by the command line (``train FAMILY ...``) so that every
rank leaves, in $GENSERVE_TEST_MARKERS, the sha256 of every network it fitted (each
``torch.nn.Module`` attribute of the estimator, by name: ``rank<R>.sha256``) and a mark for each
evaluation (``evaluated-rank<R>``). Nothing else differs from the command a user runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from genserve.cli import main
from training import registry
from training.neural import torchrun_rank

MARKERS = Path(os.environ["GENSERVE_TEST_MARKERS"])


def fitted_networks_digest(estimator) -> str:
    """sha256 over every network attribute's parameters and buffers (an error if there is none:
    equal digests of nothing would prove nothing)."""
    digest = hashlib.sha256()
    networks = [name for name in sorted(vars(estimator)) if isinstance(getattr(estimator, name), torch.nn.Module)]
    if not networks:
        raise RuntimeError(f"{type(estimator).__name__} has no fitted torch.nn.Module attribute to compare")
    for name in networks:
        digest.update(name.encode())
        for tensor in getattr(estimator, name).state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def record(estimator_class: type) -> None:
    fit_dataset, evaluate = estimator_class.fit_dataset, estimator_class.evaluate

    def recorded_fit_dataset(self, data):
        fitted = fit_dataset(self, data)
        (MARKERS / f"rank{torchrun_rank()}.sha256").write_text(fitted_networks_digest(self))
        return fitted

    def recorded_evaluate(self, data):
        (MARKERS / f"evaluated-rank{torchrun_rank()}").touch()
        return evaluate(self, data)

    estimator_class.fit_dataset, estimator_class.evaluate = recorded_fit_dataset, recorded_evaluate


if __name__ == "__main__":
    args = sys.argv[1:]
    record(registry.get(args[args.index("train") + 1]).estimator_class)
    sys.exit(main(args))
