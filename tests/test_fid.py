"""FID sanity with the standard Inception network (few images: about 6 per second on 2 cores)."""

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
    real_score = fid.score(train.uint8(range(NUM)))
    noise = torch.randint(
        0, 256, (NUM, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    noise_score = fid.score(noise)
    assert real_score < 150
    assert noise_score > 300
    assert noise_score > 3 * real_score


@pytest.mark.slow
def test_real_statistics_are_cached_per_dataset_and_count(fid, data_root, monkeypatch):
    files = list(Path(fid.cache_dir).glob(f"fid_real_fm-test_{NUM}_*.safetensors"))
    assert len(files) == 1
    again = FID(weights_path=WEIGHTS, cache_dir=fid.cache_dir, batch_size=50)

    def no_features(*args, **kwargs):
        raise AssertionError("real features were recomputed instead of loaded")

    monkeypatch.setattr(again, "_update", no_features)
    again.set_real(load_image_dataset("fashion_mnist", data_root, train=False), NUM, "fm-test")
    assert torch.equal(again.metric.real_features_sum, fid.metric.real_features_sum)


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
def test_pooled_fid_of_groups_equals_fid_of_their_union(fid, data_root):
    train = load_image_dataset("fashion_mnist", data_root, train=True)
    first, second = train.uint8(range(20)), train.uint8(range(20, 40))
    scores, pooled = fid.score_groups([first, second])
    assert scores == pytest.approx([fid.score(first), fid.score(second)], rel=1e-6)
    assert pooled == pytest.approx(fid.score(torch.cat([first, second])), rel=1e-6)
