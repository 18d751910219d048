"""One rank of the two-process gloo run in ``test_vae`` (a module of its own, so that the spawned
processes import only torch and the VAE, not the test module's onnxruntime and scipy)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch


def train_rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from training.estimators.vae import VariationalAutoencoder

    rows = np.random.default_rng(0).uniform(size=(200, 16))
    est = VariationalAutoencoder(latent_dim=2, hidden_units=16, hidden_layers=1, components=2, max_epochs=3,
                                 batch_size=32, device="cpu", verbose=False).fit(rows)
    state = b"".join(t.numpy().tobytes() for t in est.core_.state_dict().values())
    with open(os.path.join(folder, f"rank{rank}"), "w") as out:
        out.write(f"{hashlib.sha256(state).hexdigest()} {len(est.history_)} {est.history_[-1]['loss']}")
