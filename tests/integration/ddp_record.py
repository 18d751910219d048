"""``genserve`` with a recorder, for ``test_torchrun_ddp``: run by torchrun in place of
``-m genserve`` (``genserve/__main__.py`` is exactly ``main()``), it wraps the VAE's
``fit_dataset`` and ``evaluate`` so that every rank leaves, in $GENSERVE_TEST_MARKERS, the
sha256 of its fitted parameters (``rank<R>.sha256``) and a mark for each evaluation
(``evaluated-rank<R>``). Nothing else differs from the command a user runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from genserve.cli import main
from training.estimators.vae import VariationalAutoencoder
from training.neural import torchrun_rank

MARKERS = Path(os.environ["GENSERVE_TEST_MARKERS"])
_fit_dataset, _evaluate = VariationalAutoencoder.fit_dataset, VariationalAutoencoder.evaluate


def fit_dataset(self, data):
    fitted = _fit_dataset(self, data)
    state = b"".join(t.detach().cpu().numpy().tobytes() for t in self.core_.state_dict().values())
    (MARKERS / f"rank{torchrun_rank()}.sha256").write_text(hashlib.sha256(state).hexdigest())
    return fitted


def evaluate(self, data):
    (MARKERS / f"evaluated-rank{torchrun_rank()}").touch()
    return _evaluate(self, data)


VariationalAutoencoder.fit_dataset, VariationalAutoencoder.evaluate = fit_dataset, evaluate

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
