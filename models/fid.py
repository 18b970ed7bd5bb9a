"""FID with torchmetrics' ``FrechetInceptionDistance``, real statistics cached on disk.

Two feature extractors:

* default: torchmetrics' own (the standard FID Inception-v3 via torch-fidelity,
  downloaded on first use);
* ``weights_path``: the same network as a TorchScript file (offline), e.g.
  ``pt_inception-2015-12-05.torchscript.pt``: input N x 3 x 299 x 299 in
  (-1, 0.9921875) (``x / 128 - 1`` for uint8 ``x``), bilinear resize, 2048 features.

Grayscale images are repeated to three channels. The real-image statistics
(feature sums, covariance sums, count) of a dataset split and sample count are
computed once and stored as safetensors; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from models.data import LabeledImages

_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_FAKE_STATES = ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")


class TorchScriptInception(nn.Module):
    """The FID Inception network from a TorchScript file, as a torchmetrics feature extractor."""

    num_features = 2048

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"eval.fid_weights={path} does not exist; give the path of the TorchScript "
                "FID Inception network, or null to let torchmetrics download its own"
            )
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W images to N x 2048 features."""
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        # channels-last runs the convolutions about 1.35x faster on CPU (same features to 1e-5).
        return self.net((x / 128.0 - 1.0).contiguous(memory_format=torch.channels_last))


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W with C in {1, 3} as N x 3 x H x W."""
    if images.dtype != torch.uint8:
        raise TypeError(f"FID takes uint8 images, got {images.dtype}")
    if images.shape[1] == 1:
        return images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise ValueError(f"FID takes 1 or 3 channels, got {images.shape[1]}")
    return images


class FID:
    """FID of generated images against fixed real images of a dataset.

    ``cache_dir`` keeps the real statistics per (dataset, split, sample count,
    feature extractor), so each is computed once.
    """

    def __init__(
        self,
        *,
        weights_path: str | Path | None,
        cache_dir: str | Path,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir).expanduser()
        if weights_path:
            feature = TorchScriptInception(weights_path)
            self.extractor_id = "ts-" + _file_digest(Path(weights_path).expanduser())
        else:
            feature = 2048
            self.extractor_id = "torchmetrics-2048"
        # No cached compute(): score_groups sets the fake statistics directly.
        self.metric = FrechetInceptionDistance(
            feature=feature, reset_real_features=False, normalize=False, compute_with_cache=False
        ).to(self.device)
        self._real_key: str | None = None

    def _update(self, images: torch.Tensor, *, real: bool, desc: str) -> None:
        for start in tqdm(range(0, len(images), self.batch_size), desc=desc, leave=False):
            batch = to_rgb(images[start : start + self.batch_size]).to(self.device)
            self.metric.update(batch, real=real)

    def set_real(self, dataset: LabeledImages, num_samples: int, name: str) -> None:
        """Use ``num_samples`` images of ``dataset`` (a fixed random subset) as the reference."""
        if num_samples > len(dataset):
            raise ValueError(f"FID asks for {num_samples} real images; {name} has {len(dataset)}")
        key = f"{name}_{num_samples}_{self.extractor_id}"
        if key == self._real_key:
            return
        cache = self.cache_dir / f"fid_real_{key}.safetensors"
        self.metric.reset()
        for state in _REAL_STATES:  # reset() keeps real states when reset_real_features=False
            getattr(self.metric, state).zero_()
        if cache.is_file():
            stored = load_file(str(cache))
            for state in _REAL_STATES:
                getattr(self.metric, state).copy_(stored[state])
        else:
            indices = np.sort(np.random.default_rng(0).choice(len(dataset), num_samples, replace=False))
            for start in range(0, num_samples, 1024):
                chunk = indices[start : start + 1024]
                self._update(dataset.uint8(chunk), real=True, desc=f"FID real ({name})")
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp")
            save_file({s: getattr(self.metric, s).detach().cpu() for s in _REAL_STATES}, str(tmp))
            tmp.replace(cache)
        self._real_key = key

    def score(self, fake: torch.Tensor) -> float:
        """FID between the reference images and ``fake`` (uint8 N x C x H x W)."""
        if self._real_key is None:
            raise RuntimeError("call set_real() before score()")
        self.metric.reset()  # drops the previous fake features, keeps the real ones
        self._update(fake, real=False, desc="FID generated")
        return float(self.metric.compute())

    def score_groups(self, groups: list[torch.Tensor]) -> tuple[list[float], float]:
        """FID of each group of generated images, and of all groups pooled.

        The pooled FID (the mixture of the groups' generators) reuses each group's
        feature statistics, so it costs no extra Inception passes.
        """
        if self._real_key is None:
            raise RuntimeError("call set_real() before score_groups()")
        scores, pooled = [], None
        for images in groups:
            scores.append(self.score(images))
            stats = [getattr(self.metric, s).clone() for s in _FAKE_STATES]
            pooled = stats if pooled is None else [a + b for a, b in zip(pooled, stats)]
        for state, value in zip(_FAKE_STATES, pooled):
            getattr(self.metric, state).copy_(value)
        return scores, float(self.metric.compute())


def _file_digest(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
