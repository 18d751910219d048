"""``genserve`` with a recorder, for ``test_serving_cyclegan``'s torchrun test: run by torchrun in
place of ``-m genserve``, it wraps CycleGAN's ``fit_dataset`` so that every rank leaves, in
$GENSERVE_TEST_MARKERS, the sha256 of all four fitted networks' parameters (``rank<R>.sha256``).
Nothing else differs from the command a user runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from genserve.cli import main
from training.estimators.cyclegan import CycleGAN
from training.neural import torchrun_rank

MARKERS = Path(os.environ["GENSERVE_TEST_MARKERS"])
_fit_dataset = CycleGAN.fit_dataset


def fit_dataset(self, data):
    fitted = _fit_dataset(self, data)
    state = b"".join(t.detach().numpy().tobytes() for net in (self.G_, self.F_, self.D_A_, self.D_B_)
                     for t in net.state_dict().values())
    (MARKERS / f"rank{torchrun_rank()}.sha256").write_text(hashlib.sha256(state).hexdigest())
    return fitted


CycleGAN.fit_dataset = fit_dataset

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
