"""FID and KID with torchmetrics, from one Inception pass; real features cached on disk.

FID is torchmetrics' ``FrechetInceptionDistance``; KID its ``KernelInceptionDistance``
(Binkowski et al., 2018), which is unbiased, so unlike FID it does not grow when
fewer images are scored. Both read the same 2048 Inception features: each image
goes through the network once.

Two feature extractors:

* default: torchmetrics' own (the standard FID Inception-v3 via torch-fidelity,
  downloaded on first use);
* ``weights_path``: the same network as a TorchScript file (offline), e.g.
  ``pt_inception-2015-12-05.torchscript.pt``: input N x 3 x 299 x 299 in
  (-1, 0.9921875) (``x / 128 - 1`` for uint8 ``x``), bilinear resize, 2048 features.

Grayscale images are repeated to three channels. The real images' FID statistics
(feature sums, covariance sums, count) and KID features of a dataset split and
sample count are computed once and stored as safetensors; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from models.data import LabeledImages
from models.durable import write_atomic

_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_KID_REAL = "kid_real_features"  # the real features themselves, for KID's kernels
# KID on unequal counts (a client's share against all real images) averages this many
# random equal-size subsets, drawn from a fixed seed; on equal counts one subset is all.
KID_SUBSETS = 10


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


class _Precomputed(nn.Module):
    """Lets torchmetrics' metrics take features that were already extracted."""

    num_features = 2048

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


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
    """FID and KID of generated images against fixed real images of a dataset.

    ``cache_dir`` keeps the real features per (dataset, split, sample count,
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
            self.extractor = TorchScriptInception(weights_path)
            self.extractor_id = "ts-" + _file_digest(Path(weights_path).expanduser())
        else:  # what FrechetInceptionDistance(feature=2048) builds
            self.extractor = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
            self.extractor_id = "torchmetrics-2048"
        self.extractor = self.extractor.to(self.device)
        # No cached compute(): score_groups sets the fake statistics directly.
        self.metric = FrechetInceptionDistance(
            feature=_Precomputed(), reset_real_features=False, compute_with_cache=False
        ).to(self.device)
        with warnings.catch_warnings():  # that it keeps every feature: 8 KiB per image, by design
            warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save")
            self.kid = KernelInceptionDistance(feature=_Precomputed(), reset_real_features=False)
        self.kid = self.kid.to(self.device)
        self._real_key: str | None = None

    def _features(self, images: torch.Tensor, desc: str) -> torch.Tensor:
        """uint8 N x C x H x W images to N x 2048 Inception features, in batches."""
        out = []
        for start in tqdm(range(0, len(images), self.batch_size), desc=desc, leave=False):
            batch = to_rgb(images[start : start + self.batch_size]).to(self.device)
            with torch.no_grad():
                out.append(self.extractor(batch).float())
        return torch.cat(out)

    def set_real(self, dataset: LabeledImages, num_samples: int, name: str) -> None:
        """Use ``num_samples`` images of ``dataset`` (a fixed random subset) as the reference."""
        if num_samples > len(dataset):
            raise ValueError(f"FID asks for {num_samples} real images; {name} has {len(dataset)}")
        key = f"{name}_{num_samples}_{self.extractor_id}"
        if key == self._real_key:
            return
        cache = self.cache_dir / f"fid_real_{key}.safetensors"
        stored = load_file(str(cache)) if cache.is_file() else {}
        if _KID_REAL not in stored:  # no cache, or one written before KID
            stored = self._real_features(dataset, num_samples, name)
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, lambda tmp: save_file(stored, str(tmp)))
        self.metric.reset()
        for state in _REAL_STATES:  # reset() keeps real states when reset_real_features=False
            getattr(self.metric, state).copy_(stored[state])
        self.kid.real_features = [stored[_KID_REAL].to(self.device)]
        self._real_key = key

    def _real_features(self, dataset: LabeledImages, num_samples: int, name: str) -> dict:
        """FID's real statistics and KID's real features of a fixed random subset of ``dataset``."""
        indices = np.sort(np.random.default_rng(0).choice(len(dataset), num_samples, replace=False))
        features = torch.cat(
            [
                self._features(dataset.uint8(indices[start : start + 1024]), desc=f"FID real ({name})")
                for start in range(0, num_samples, 1024)
            ]
        )
        fid = FrechetInceptionDistance(feature=_Precomputed(), reset_real_features=False).to(self.device)
        fid.update(features, real=True)
        stored = {s: getattr(fid, s).detach().cpu() for s in _REAL_STATES}
        stored[_KID_REAL] = features.cpu().contiguous()
        return stored

    def score(self, fake: torch.Tensor) -> dict[str, float]:
        """``{"fid", "kid"}`` of ``fake`` (uint8 N x C x H x W) against the reference images."""
        if self._real_key is None:
            raise RuntimeError("call set_real() before score()")
        return self._score_features(self._features(fake, desc="FID generated"))

    def _score_features(self, features: torch.Tensor) -> dict[str, float]:
        self.metric.reset()  # drops the previous fake features, keeps the real ones
        self.metric.update(features, real=False)
        self.kid.reset()
        self.kid.update(features, real=False)
        return {"fid": float(self.metric.compute()), "kid": self._kid()}

    def _kid(self) -> float:
        """KID's mean over subsets, from a fixed seed that leaves the global RNG as it was."""
        real, fake = len(self.kid.real_features[0]), sum(len(f) for f in self.kid.fake_features)
        self.kid.subset_size = min(real, fake)
        self.kid.subsets = 1 if real == fake else KID_SUBSETS
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mean, _ = self.kid.compute()
        return float(mean)

    def score_groups(self, groups: list[torch.Tensor]) -> tuple[list[dict[str, float]], dict[str, float]]:
        """FID and KID of each group of generated images, and of all groups pooled.

        The pooled scores (the mixture of the groups' generators) reuse each group's
        features, so they cost no extra Inception passes.
        """
        if self._real_key is None:
            raise RuntimeError("call set_real() before score_groups()")
        features = [self._features(images, desc="FID generated") for images in groups]
        return [self._score_features(f) for f in features], self._score_features(torch.cat(features))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
