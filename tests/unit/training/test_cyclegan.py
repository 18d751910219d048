"""CycleGAN: the loss terms against hand-computed values, shape-preserving networks, the image
pool, parameter validation, a short training run, ONNX parity of both translate graphs, and the
PNG-folder translation datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.datasets import Dataset, digits_bold, load
from training.estimators.cyclegan import CycleGAN
from training.estimators.cyclegan_losses import (cycle_loss, identity_loss, lsgan_discriminator_loss,
                                                 lsgan_generator_loss)
from training.estimators.cyclegan_nets import ConvDiscriminator, ConvGenerator, ImagePool, MLPGenerator
from training.export import export_and_check

torch.set_num_threads(1)

# A tiny, fast configuration: a few hundred steps' worth of behaviour in well under a second each.
TINY = dict(width=8, blocks=1, downsamplings=0, norm="none", hidden=32, batch_size=64, device="cpu", verbose=False)


@pytest.fixture(scope="module")
def bold() -> Dataset:
    return digits_bold()


@pytest.fixture(scope="module")
def fitted(bold) -> CycleGAN:
    return CycleGAN(epochs=2, decay_epochs=1, **TINY).fit_dataset(bold)


# ---- losses ------------------------------------------------------------------------------------
def test_lsgan_losses_match_hand_computed_values():
    real, fake = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 0.5, -1.0])
    # ½ · (mean[0, 0.25, 1] + mean[0, 0.25, 1]) = ½ · (1.25/3 + 1.25/3)
    assert lsgan_discriminator_loss(real, fake).item() == pytest.approx(1.25 / 3)
    # mean[(0-1)², (0.5-1)², (-1-1)²] = (1 + 0.25 + 4) / 3
    assert lsgan_generator_loss(fake).item() == pytest.approx(5.25 / 3)
    # a perfect discriminator and a generator that fools it
    assert lsgan_discriminator_loss(torch.ones(4), torch.zeros(4)).item() == 0.0
    assert lsgan_generator_loss(torch.ones(4)).item() == 0.0


def test_cycle_and_identity_losses_match_hand_computed_values():
    a = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    a_back = torch.tensor([[0.5, 1.0], [0.5, 0.0]])      # |diff| = 0.5, 0, 0, 0.5 -> mean 0.25
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    b_back = torch.tensor([[0.0, 1.0, 1.0, 0.0]])        # |diff| = 1, 0, 0, 1 -> mean 0.5
    assert cycle_loss(a, a_back, b, b_back).item() == pytest.approx(0.75)
    assert identity_loss(a, a_back, b, b_back).item() == pytest.approx(0.75)
    assert cycle_loss(a, a, b, b).item() == 0.0
    # identity pairs G(b) with b and F(a) with a — not crossed
    assert identity_loss(a, a, b, b_back).item() == pytest.approx(0.5)


# ---- networks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,downsamplings,norm", [((1, 8, 8), 0, "none"), ((1, 8, 8), 1, "instance"),
                                                      ((3, 4, 6), 1, "none")])
def test_conv_generator_preserves_shape_and_range(shape, downsamplings, norm):
    torch.manual_seed(0)
    G = ConvGenerator(shape, width=4, blocks=2, downsamplings=downsamplings, norm=norm)
    x = torch.rand(5, int(np.prod(shape)))
    y = G(x)
    assert y.shape == x.shape
    assert ((y > 0) & (y < 1)).all()  # sigmoid output for images in [0, 1]
    D = ConvDiscriminator(shape, width=4, downsamplings=downsamplings, norm=norm)
    assert D(x).shape[0] == 5


def test_mlp_generator_preserves_shape_and_is_unbounded_for_rows():
    torch.manual_seed(0)
    x = 10 * torch.randn(7, 3)
    assert MLPGenerator(3, hidden=16, bounded=False)(x).shape == (7, 3)


def test_image_pool_mixes_past_fakes_and_keeps_shapes():
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(ImagePool(0, generator).query(torch.ones(3, 2)), torch.ones(3, 2))
    pool = ImagePool(4, generator)
    first = pool.query(torch.zeros(4, 2))          # fills the pool, returns the fakes themselves
    assert torch.equal(first, torch.zeros(4, 2))
    shown = torch.cat([pool.query(torch.ones(4, 2)) for _ in range(10)])
    assert shown.shape == (40, 2)
    assert (shown == 0).any() and (shown == 1).any()  # some old fakes shown, some new


# ---- parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize("params,message", [
    ({"architecture": "resnet"}, "architecture: expected one of"),
    ({"discriminator": "pixel"}, "discriminator: expected one of"),
    ({"norm": "batch"}, "norm: expected one of"),
    ({"width": 0}, "width: expected an integer >= 1"),
    ({"epochs": 2, "decay_epochs": 3}, "decay_epochs: expected an integer <= epochs"),
    ({"lambda_cycle": -1.0}, "lambda_cycle: expected a finite number >= 0"),
    ({"learning_rate": 0.0}, "learning_rate: expected a finite number > 0"),
    ({"beta1": 1.0}, "beta1: expected a number in [0, 1)"),
    ({"device": "tpu"}, "device: expected"),
])
def test_bad_parameters_are_rejected_with_the_allowed_values(params, message):
    x = np.random.default_rng(0).uniform(size=(10, 64))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        CycleGAN(**{**TINY, **params}).fit(x, x, image_shape=(8, 8))


def test_fit_needs_two_domains_of_one_row_shape(bold):
    x = np.random.default_rng(0).uniform(size=(10, 64))
    with pytest.raises(ValueError, match="X_b"):
        CycleGAN(**TINY).fit(x)
    with pytest.raises(ValueError, match="same row shape"):
        CycleGAN(**TINY).fit(x, x[:, :32])
    with pytest.raises(ValueError, match="two domains"):
        CycleGAN(**TINY).fit_dataset(Dataset("digits", bold.X_train, bold.X_test))
    with pytest.raises(ValueError, match="'conv' needs images"):
        CycleGAN(**{**TINY, "architecture": "conv"}).fit(x, x)


# ---- training ----------------------------------------------------------------------------------
def test_short_training_lowers_the_cycle_loss_and_logs_every_epoch(bold):
    estimator = CycleGAN(epochs=6, decay_epochs=2, learning_rate=2e-3, **TINY).fit_dataset(bold)
    history = estimator.history_
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert set(history[0]) == {"epoch", "loss_g", "adversarial", "cycle", "identity", "loss_d"}
    assert history[-1]["cycle"] < 0.7 * history[0]["cycle"]
    assert history[-1]["loss_g"] < history[0]["loss_g"]


def test_same_seed_same_model(bold, fitted):
    again = CycleGAN(epochs=2, decay_epochs=1, **TINY).fit_dataset(bold)
    np.testing.assert_array_equal(again.translate(bold.X_test[:20]), fitted.translate(bold.X_test[:20]))


def test_mlp_architecture_on_plain_rows():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 3)), rng.normal(loc=5.0, size=(50, 3))
    estimator = CycleGAN(epochs=1, decay_epochs=0, **TINY).fit(a, b)
    assert estimator.architecture_ == "mlp" and not estimator.bounded_
    assert estimator.translate(a, "a2b").shape == (40, 3)
    assert estimator.translate(b, "b2a").shape == (50, 3)
    with pytest.raises(ValueError, match="direction"):
        estimator.translate(a, "sideways")


# ---- export ------------------------------------------------------------------------------------
def test_both_translate_graphs_export_with_parity(fitted, bold, tmp_path):
    graphs = {g.name: g for g in fitted.export_graphs()}
    assert set(graphs) == {"translate_a2b", "translate_b2a"}
    for name, graph in graphs.items():
        assert [s.shape for s in graph.inputs] == [[-1, 64]] and [s.shape for s in graph.outputs] == [[-1, 64]]
        assert all(s.noise is None for s in graph.inputs)  # deterministic: no noise inputs
        feeds = fitted.check_feeds(graph, bold, 100)
        source = bold.X_test_b if name == "translate_b2a" else bold.X_test
        np.testing.assert_array_equal(feeds["x"], source[:100].astype(np.float32))
        parity = export_and_check(graph, tmp_path, feeds, tolerance=1e-5)
        assert parity.max_abs_diff < 1e-5
        assert (tmp_path / f"{name}.onnx").is_file()


def test_evaluate_reports_cycle_and_paired_errors(fitted, bold):
    figures = fitted.evaluate(bold)
    assert set(figures) == {"test_cycle_l1_a", "test_cycle_l1_b", "test_mae_a2b", "test_mae_b2a",
                            "test_mae_untranslated"}
    assert figures["test_mae_untranslated"] == pytest.approx(np.mean(np.abs(bold.X_test - bold.X_test_b)))
    assert fitted.input_shape(bold) == [64]


def test_pictures_are_saved(fitted, bold, tmp_path):
    fitted.save_pictures(bold, tmp_path, "test")
    assert (tmp_path / "translations.png").stat().st_size > 0
    assert (tmp_path / "training.png").stat().st_size > 0


# ---- PNG folders -------------------------------------------------------------------------------
def _write_pngs(folder, count, size=(6, 4), mode="L", seed=0, names=None):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(count):
        pixels = rng.integers(0, 256, size=(h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / (names[i] if names else f"{i:03d}.png"))


def test_png_folders_with_a_and_b_load_as_an_unpaired_translation_dataset(tmp_path):
    _write_pngs(tmp_path / "pairs" / "A", 10, seed=1)
    _write_pngs(tmp_path / "pairs" / "B", 20, seed=2)
    data = load(str(tmp_path / "pairs"))
    assert data.name == "pairs" and data.image_shape == (6, 4) and not data.paired_test
    assert data.X_train.shape == (7, 24) and data.X_test.shape == (3, 24)
    assert data.X_train_b.shape == (14, 24) and data.X_test_b.shape == (6, 24)
    assert 0.0 <= data.X_train.min() and data.X_train.max() <= 1.0
    # rows are the images scaled to [0, 1], in row-major (H, W) order
    pixels = np.asarray(Image.open(tmp_path / "pairs" / "A" / "000.png"), dtype=np.float64) / 255
    all_a = np.concatenate([data.X_train, data.X_test])
    assert np.isclose(all_a, pixels.ravel()).all(axis=1).any()


def test_png_folders_in_the_cyclegan_layout_rgb_and_paired_test(tmp_path):
    root = tmp_path / "horse2zebra"
    _write_pngs(root / "trainA", 5, mode="RGB", seed=1)
    _write_pngs(root / "trainB", 6, seed=2)  # grayscale, read as RGB because A has colour
    _write_pngs(root / "testA", 3, seed=3, names=["x.png", "y.png", "z.png"])
    _write_pngs(root / "testB", 3, seed=4, names=["x.png", "y.png", "z.png"])
    data = load(str(root))
    assert data.X_train.shape == (5, 72) and data.X_train_b.shape == (6, 72) and data.X_test.shape == (3, 72)
    assert data.paired_test
    # channel-major rows: the first H*W entries are the red channel
    red = np.asarray(Image.open(root / "trainA" / "000.png"), dtype=np.float64)[..., 0] / 255
    np.testing.assert_allclose(data.X_train[0, :24], red.ravel())
    estimator = CycleGAN(epochs=1, decay_epochs=0, **{**TINY, "batch_size": 4}).fit_dataset(data)
    assert estimator.image_shape_ == (3, 6, 4)
    assert estimator.translate(data.X_test_b, "b2a").shape == (3, 72)


def test_png_folders_reject_mixed_sizes_and_missing_domains(tmp_path):
    _write_pngs(tmp_path / "bad" / "A", 4, size=(6, 4))
    _write_pngs(tmp_path / "bad" / "B", 4, size=(5, 4))
    with pytest.raises(ValueError, match="same size"):
        load(str(tmp_path / "bad"))
    _write_pngs(tmp_path / "lonely" / "A", 4)
    with pytest.raises(ValueError, match="A/ and B/"):
        load(str(tmp_path / "lonely"))
