"""FID and KID sanity with the standard Inception network (few images: about 6 per second on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import load_image_dataset
from models.fid import FID, TorchScriptInception, to_rgb
from tests.conftest import REPO_ROOT

WEIGHTS = REPO_ROOT.parent / "shared" / "weights" / "pt_inception-2015-12-05.torchscript.pt"
NUM = 80  # with 1000 each, train vs test is about 23 (shared/README.md); 80 biases it up


@pytest.fixture(scope="module")
def fid(tmp_path_factory, data_root):
    if not WEIGHTS.is_file():
        pytest.fail(f"FID weights not found at {WEIGHTS}")
    metric = FID(weights_path=WEIGHTS, cache_dir=tmp_path_factory.mktemp("fid"), batch_size=50)
    metric.set_real(load_image_dataset("fashion_mnist", data_root, train=False), NUM, "fm-test")
    return metric


@pytest.mark.slow
def test_train_images_are_close_and_noise_is_far(fid, data_root):
    train = load_image_dataset("fashion_mnist", data_root, train=True)
    real = fid.score(train.uint8(range(NUM)))
    noise = torch.randint(
        0, 256, (NUM, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    rng_before = torch.random.get_rng_state()
    far = fid.score(noise)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # KID's subsets use a forked RNG
    assert real["fid"] < 150
    assert far["fid"] > 300
    assert far["fid"] > 3 * real["fid"]
    # KID is unbiased: near 0 for images of the same distribution (can dip below 0), far for noise.
    assert abs(real["kid"]) < 0.05
    assert far["kid"] > 10 * max(real["kid"], 0.01)


@pytest.mark.slow
def test_real_statistics_are_cached_per_dataset_and_count(fid, data_root, monkeypatch):
    files = list(Path(fid.cache_dir).glob(f"fid_real_fm-test_{NUM}_*.safetensors"))
    assert len(files) == 1
    again = FID(weights_path=WEIGHTS, cache_dir=fid.cache_dir, batch_size=50)

    def no_features(*args, **kwargs):
        raise AssertionError("real features were recomputed instead of loaded")

    monkeypatch.setattr(again, "_features", no_features)
    again.set_real(load_image_dataset("fashion_mnist", data_root, train=False), NUM, "fm-test")
    assert torch.equal(again.metric.real_features_sum, fid.metric.real_features_sum)
    assert torch.equal(again.kid.real_features[0], fid.kid.real_features[0])


def test_grayscale_is_repeated_to_rgb():
    gray = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    rgb = to_rgb(gray)
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2])
    with pytest.raises(TypeError, match="uint8"):
        to_rgb(gray.float())


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.fid_weights"):
        TorchScriptInception(tmp_path / "nope.pt")


@pytest.mark.slow
def test_pooled_scores_of_groups_equal_scores_of_their_union(fid, data_root):
    train = load_image_dataset("fashion_mnist", data_root, train=True)
    first, second = train.uint8(range(20)), train.uint8(range(20, 40))
    scores, pooled = fid.score_groups([first, second])
    for got, want in zip(scores, [fid.score(first), fid.score(second)]):
        assert got == pytest.approx(want, rel=1e-6)
    assert pooled == pytest.approx(fid.score(torch.cat([first, second])), rel=1e-6)


@pytest.mark.slow
def test_kid_equals_a_hand_computed_unbiased_mmd(fid, data_root):
    """On equal counts KID is the unbiased MMD^2 of the cubic kernel (x.y / d + 1)^3 on all features."""
    train = load_image_dataset("fashion_mnist", data_root, train=True)
    features = fid._features(train.uint8(range(NUM, 2 * NUM)), desc="test")
    fake, real = features.double(), fid.kid.real_features[0].double()
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    m = len(real)
    k_rr, k_ff, k_rf = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    want = (k_rr.sum() - k_rr.trace() + k_ff.sum() - k_ff.trace()) / (m * (m - 1)) - 2 * k_rf.mean()
    assert fid._score_features(features)["kid"] == pytest.approx(float(want), rel=1e-4)
