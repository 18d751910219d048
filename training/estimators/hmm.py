"""Gaussian hidden Markov model for batches of equal-length sequences [N, T, D], fitted by
Baum–Welch (EM). The maths — scaled forward recursion, smoothing, M-step, why the likelihood
never falls, and the exported loops — is in ``training.estimators.hmm_core``.

Served graphs:

* ``score``: x [N, T, D] -> log p(x) [N], the forward recursion as an ONNX ``Loop``: T is read
  from the input, so sequences of any length score exactly (not only the traced length).
* ``sample``: uniform noise u [N, T] drives the state chain, normal noise z [N, T, D] the
  emissions; both declare axis 1 as "length", so ``Sample(length=...)`` resizes them. The
  default length is the training sequences' length.

The anomaly score is -log p(sequence), its threshold cross-fitted over the training sequences.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from serving.repository.manifest import TensorSpec
from serving.repository.noise import draw_noise
from training.estimators.base import ExportGraph, GenerativeEstimator, SampleGraph, ScoreGraph
from training.estimators.gmm import SingularCovarianceError, _is_int
from training.neural import capped_threads
from training.estimators.hmm_core import EMResult, HMMCore, em, posterior
from training.neural import progress

COVARIANCE_TYPES = ("full", "diag")
DEFAULT_CANDIDATES = (1, 2, 3, 4, 5, 6, 8)
VALIDATION_FRACTION = 0.2


def as_sequences(X: Any, name: str = "X") -> torch.Tensor:
    """Validate a 3-D array of finite sequences [N, T, D] and return it as float64."""
    array = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    if array.ndim != 3:
        hint = " (one sequence [T, D]: pass X[None])" if array.ndim == 2 else ""
        raise ValueError(f"{name} must be 3-D [n_sequences, length, n_features], got shape {array.shape}{hint}")
    if 0 in array.shape:
        raise ValueError(f"{name} must have at least one sequence, step and feature, got {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return torch.as_tensor(np.asarray(array, dtype=np.float64))


class GaussianHMM(GenerativeEstimator):
    """Gaussian hidden Markov model for sequences [N, T, D], fitted by Baum–Welch EM.

    The number of states is given or chosen on held-out sequences.

    Parameters
    ----------
    n_states : int >= 1 or "auto", default "auto"
        K, or "auto" to pick it among ``candidate_states`` by the mean log-likelihood of a
        held-out 20% of the training sequences (a seeded split); the winner is refitted on all.
    covariance_type : "full" or "diag", default "full"
        Emission covariances per state.
    n_iter : int >= 1, default 100
        EM iterations per run.
    tol : float >= 0, default 1e-4
        EM stops when the mean log-likelihood *per time step* changes by less than this.
    n_init : int >= 1, default 3
        EM runs from different k-means++ starts; the highest final likelihood is kept.
    reg_covar : float >= 0, default 1e-6
        Added to every emission covariance diagonal; 0 is pure maximum likelihood.
    random_state : int >= 0, default 0
        Seeds every random choice; the same seed gives the same fit.
    candidate_states : sequence of int, default (1, 2, 3, 4, 5, 6, 8)
        K values tried when ``n_states="auto"`` (those above the number of frames are dropped).
    verbose : bool, default False
        Show a progress bar over EM runs.

    Attributes (after fit)
    ----------------------
    startprob_ [K], transmat_ [K, K], means_ [K, D], covariances_ ([K, D, D] or [K, D]),
    n_states_, sample_length_ (the training length: the sample graph's default), selection_scores_,
    lower_bounds_ (mean log-likelihood per sequence after each EM iteration of the final fit),
    converged_, n_iter_, n_reseeds_, history_.
    """

    family = "hmm"
    card_limits = (
        "log p(sequence) is a sum over time steps, so it scales with the length: the anomaly "
        "threshold was calibrated on sequences of the training length and means nothing for "
        "other lengths (pass an explicit threshold, or compare per-step figures). Emissions are "
        "single Gaussians per state and the state chain is first-order Markov; EM finds a local "
        "maximum (restarts reduce, not remove, the risk), and states are identified only up to "
        "relabelling.")

    def __init__(self, n_states: int | str = "auto", covariance_type: str = "full", n_iter: int = 100,
                 tol: float = 1e-4, n_init: int = 3, reg_covar: float = 1e-6, random_state: int = 0,
                 candidate_states: Sequence[int] = DEFAULT_CANDIDATES, verbose: bool = False):
        self.n_states = n_states
        self.covariance_type = covariance_type
        self.n_iter = n_iter
        self.tol = tol
        self.n_init = n_init
        self.reg_covar = reg_covar
        self.random_state = random_state
        self.candidate_states = candidate_states
        self.verbose = verbose

    # ---- parameters ----------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {"n_states": self.n_states, "covariance_type": self.covariance_type, "n_iter": self.n_iter,
                "tol": self.tol, "n_init": self.n_init, "reg_covar": self.reg_covar,
                "random_state": self.random_state, "candidate_states": list(self.candidate_states),
                "verbose": self.verbose}

    def fitted_params(self) -> dict[str, Any]:
        """The constructor parameters with "auto" replaced by the chosen number of states."""
        self._check_fitted()
        return {**self.get_params(), "n_states": self.n_states_}

    def _validate_params(self, n_sequences: int, n_frames: int) -> None:
        def is_float(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not (self.n_states == "auto" or (_is_int(self.n_states) and self.n_states >= 1)):
            raise ValueError(f"n_states must be an int >= 1 or 'auto', got {self.n_states!r}")
        if self.covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of 'full', 'diag', got {self.covariance_type!r}")
        if not (_is_int(self.n_iter) and self.n_iter >= 1):
            raise ValueError(f"n_iter must be an int >= 1, got {self.n_iter!r}")
        if not (is_float(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a float >= 0, got {self.tol!r}")
        if not (_is_int(self.n_init) and self.n_init >= 1):
            raise ValueError(f"n_init must be an int >= 1, got {self.n_init!r}")
        if not (is_float(self.reg_covar) and self.reg_covar >= 0):
            raise ValueError(f"reg_covar must be a float >= 0, got {self.reg_covar!r}")
        if not (_is_int(self.random_state) and self.random_state >= 0):
            raise ValueError(f"random_state must be an int >= 0, got {self.random_state!r}")
        c = self.candidate_states
        if (isinstance(c, (str, bytes)) or not hasattr(c, "__len__") or len(c) == 0
                or not all(_is_int(k) and k >= 1 for k in c)):
            raise ValueError(f"candidate_states must be a non-empty sequence of ints >= 1, got {c!r}")
        if not isinstance(self.verbose, (bool, np.bool_)):
            raise ValueError(f"verbose must be True or False, got {self.verbose!r}")
        if _is_int(self.n_states) and self.n_states > n_frames:
            raise ValueError(f"n_states must be <= the number of frames (sequences x length = {n_frames}), "
                             f"got {self.n_states}")
        if self.n_states == "auto" and n_sequences < 5:
            raise ValueError(f"n_states='auto' holds out 20% of the sequences and needs at least 5, "
                             f"got {n_sequences}: give n_states an int")

    # ---- fitting -------------------------------------------------------------------------
    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([int(self.random_state), *stream]))

    def _best_of(self, x: torch.Tensor, K: int, stream: tuple[int, ...], bar: Any) -> EMResult:
        """``n_init`` EM runs; the one with the highest final mean log-likelihood."""
        best = None
        for restart in range(self.n_init):
            bar.set_postfix_str(f"K={K} run {restart + 1}/{self.n_init}")
            result = em(x, K, self.covariance_type, float(self.reg_covar), float(self.tol), int(self.n_iter),
                        self._rng(*stream, restart))
            bar.update(1)
            if best is None or result.lower_bounds[-1] > best.lower_bounds[-1]:
                best = result
        return best

    def fit(self, X: Any, y: Any = None) -> "GaussianHMM":
        """Fit on sequences ``X`` [N, T, D]; ``y`` is ignored."""
        x = as_sequences(X)
        N, T, D = x.shape
        self._validate_params(N, N * T)
        if self.n_states == "auto":
            ks = sorted({int(k) for k in self.candidate_states if k <= N * T}) or [1]
        else:
            ks = [int(self.n_states)]
        runs = (len(ks) + 1 if len(ks) > 1 else 1) * self.n_init
        self.selection_scores_: list[dict[str, Any]] = []
        with capped_threads(x.numel()), torch.no_grad(), \
                progress(None, "hmm EM", total=runs, enabled=bool(self.verbose)) as bar:
            if len(ks) > 1:
                ks = [self._select(x, ks, bar)]
            best = self._best_of(x, ks[0], (3, ks[0]), bar)
        self.core_ = best.core
        self.n_states_, self.n_features_in_, self.sample_length_ = ks[0], D, T
        self.startprob_, self.transmat_ = best.start, best.transmat
        self.means_, self.covariances_ = best.means, best.covariances
        self.lower_bounds_, self.converged_, self.n_iter_ = best.lower_bounds, best.converged, best.n_iter
        self.n_reseeds_ = best.n_reseeds
        self.history_ = [{"epoch": i + 1, "log_likelihood": b} for i, b in enumerate(best.lower_bounds)]
        if not self.converged_:
            warnings.warn(f"EM did not converge within n_iter={self.n_iter} iterations (tol={self.tol}); "
                          "increase n_iter or tol", RuntimeWarning, stacklevel=2)
        return self

    def _select(self, x: torch.Tensor, ks: list[int], bar: Any) -> int:
        """The K with the highest mean log-likelihood on 20% of the sequences held out."""
        N = x.shape[0]
        order = torch.as_tensor(self._rng(1).permutation(N))
        n_val = max(1, round(VALIDATION_FRACTION * N))
        x_val, x_fit = x[order[:n_val]], x[order[n_val:]]
        scores = []
        for K in ks:
            try:
                fitted = self._best_of(x_fit, K, (2, K), bar)
                score = float(fitted.core.log_prob(x_val).mean())
            except SingularCovarianceError:
                score = -math.inf
            scores.append(score)
            self.selection_scores_.append({"n_states": K, "score": score, "metric": "validation_log_likelihood"})
        if all(s == -math.inf for s in scores):
            raise SingularCovarianceError("every candidate had a singular covariance: set reg_covar > 0")
        return ks[int(np.argmax(scores))]

    # ---- using the fitted model ----------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "core_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit first")

    def _sequences(self, X: Any) -> torch.Tensor:
        self._check_fitted()
        x = as_sequences(X)
        if x.shape[2] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[2]} features per step, the model was fitted on {self.n_features_in_}")
        return x

    @torch.no_grad()
    def log_prob(self, X: Any) -> torch.Tensor:
        """float64 [N] log p(sequence) in nats, for sequences of any length T >= 1."""
        x = self._sequences(X)
        return self.core_.log_prob(x)

    def score_samples(self, X: Any) -> np.ndarray:
        return self.log_prob(X).numpy()

    def score(self, X: Any) -> float:
        """Mean log-likelihood per sequence."""
        return float(self.log_prob(X).mean())

    @torch.no_grad()
    def predict_proba(self, X: Any) -> np.ndarray:
        """Posterior state probabilities p(s_t = k | x) [N, T, K] (forward-filtering backward-smoothing)."""
        x = self._sequences(X)
        return posterior(self.core_.log_emission(x), self.startprob_, self.transmat_).gamma.numpy()

    def noise_specs(self) -> list[TensorSpec]:
        self._check_fitted()
        return self.core_.noise_specs()

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, length: int | None = None) -> torch.Tensor:
        """``n`` sequences [n, length, D] (default: the training length), float64, from noise drawn
        exactly as the server draws it for ``seed`` (and ``Sample(length=...)``)."""
        specs = self.noise_specs()
        noise = draw_noise(specs, n, seed, {"length": length} if length else None)
        return self.core_.sample_from_noise(*(torch.from_numpy(noise[s.name]) for s in specs))

    def export_graphs(self) -> list[ExportGraph]:
        self._check_fitted()
        D = self.n_features_in_
        return [ExportGraph("score", ScoreGraph(self.core_).eval(), [TensorSpec(name="x", shape=[-1, -1, D])],
                            [TensorSpec(name="log_prob", shape=[-1])]),
                ExportGraph("sample", SampleGraph(self.core_).eval(), self.noise_specs(),
                            [TensorSpec(name="samples", shape=[-1, -1, D])])]

    # ---- pipeline hooks ------------------------------------------------------------------
    def input_shape(self, data: Any) -> list[int]:
        return [-1, int(data.X_train.shape[-1])]  # sequences of any length

    def evaluate(self, data: Any) -> dict[str, float]:
        """Mean log-likelihood per sequence and per time step on the training and test parts."""
        out: dict[str, float] = {}
        for part, X in (("train", data.X_train), ("test", data.X_test)):
            ll = self.score(X)
            out[f"{part}_log_likelihood"] = ll
            out[f"{part}_log_likelihood_per_step"] = ll / X.shape[1]
        out["n_states"] = float(self.n_states_)
        out["em_iterations"] = float(self.n_iter_)
        return out

    def calibration_method(self, folds: int) -> str:
        return f"{folds}-fold cross-fitted -log p(sequence) quantile"

    def calibration_scores(self, data: Any, folds: int) -> np.ndarray:
        """Cross-fitted -log p of every training sequence (see ``training.calibration``)."""
        from training.calibration import cross_fitted_scores

        chosen = {**self.fitted_params(), "verbose": False}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the final fit already warned
            return cross_fitted_scores(lambda: type(self)(**chosen), data.X_train, folds)

    def save_pictures(self, data: Any, folder: Any, title: str) -> None:
        """samples.png: sampled sequences over time beside the frames, state means and samples in
        the plane of the first two features; training.png: the EM log-likelihood per iteration."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from training.plots import save_training_curve

        samples = self.sample(200, seed=0).numpy()
        means = self.means_.numpy()
        D = self.n_features_in_
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        steps = np.arange(samples.shape[1])
        states = self.predict_proba(samples[:3]).argmax(axis=2)
        spread = float(np.ptp(samples[:3, :, 0])) or 1.0
        for i in range(3):  # feature 0 of three sequences, stacked, each step coloured by its state
            offset = -1.2 * spread * i
            axes[0].plot(steps, samples[i, :, 0] + offset, c="0.6", lw=1)
            points = axes[0].scatter(steps, samples[i, :, 0] + offset, c=states[i], s=12, cmap="tab10",
                                     vmin=0, vmax=9)
        handles = [axes[0].scatter([], [], color=points.cmap(points.norm(k)), s=12) for k in range(self.n_states_)]
        axes[0].legend(handles, [str(k) for k in range(self.n_states_)], title="state", fontsize=7,
                       loc="upper right")
        axes[0].set_yticks([])
        axes[0].set_xlabel("time step")
        axes[0].set_title("feature 0 of three sampled sequences (seed 0),\ncoloured by the most probable state")
        if D >= 2:
            train = data.X_train.reshape(-1, D)[:5000]
            axes[1].scatter(train[:, 0], train[:, 1], s=2, alpha=0.3, label="training frames")
            flat = samples.reshape(-1, D)[:5000]
            axes[1].scatter(flat[:, 0], flat[:, 1], s=2, alpha=0.3, label="sampled frames")
            axes[1].scatter(means[:, 0], means[:, 1], marker="x", s=80, c="k", label="state means")
            for k, (mx, my) in enumerate(means[:, :2]):
                axes[1].annotate(str(k), (mx, my), textcoords="offset points", xytext=(6, 6))
            axes[1].set_xlabel("feature 0")
            axes[1].set_ylabel("feature 1")
        else:
            axes[1].hist(data.X_train.reshape(-1), bins=60, alpha=0.5, density=True, label="training frames")
            axes[1].hist(samples.reshape(-1), bins=60, alpha=0.5, density=True, label="sampled frames")
            for m in means[:, 0]:
                axes[1].axvline(m, c="k", lw=1)
        axes[1].legend(fontsize=7, loc="upper right")
        axes[1].set_title(f"{self.n_states_} states")
        fig.suptitle(title)
        fig.savefig(folder / "samples.png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        save_training_curve(self.history_, folder / "training.png", title)
