"""Image datasets from torchvision, scaled to [-1, 1], with one integer label per image.

The labels are what non-IID partitioners split by; the images never leave the
process that loads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

# torchvision class and the folder it expects under the root, per dataset name.
_TORCHVISION = {
    "fashion_mnist": (torchvision.datasets.FashionMNIST, "FashionMNIST/raw"),
    "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py"),
    "celeba": (torchvision.datasets.CelebA, "celeba"),
}
# Local image folders: ROOT/train/<label>/*.png|jpg and ROOT/test/<label>/*.png|jpg.
IMAGE_FOLDER = "image_folder"
SUPPORTED_DATASETS = (*_TORCHVISION, IMAGE_FOLDER)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where the config says; the message says how to get them."""


class LabeledImages(Dataset):
    """Images as float tensors C x H x W in [-1, 1]; ``labels[i]`` is image i's label."""

    def __init__(self, images: Dataset | torch.Tensor, labels: np.ndarray) -> None:
        self._images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(images) != len(self.labels):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._images[index]
        if isinstance(image, tuple):  # torchvision datasets return (image, target)
            image = image[0]
        if image.dtype == torch.uint8:
            image = image.float() / 127.5 - 1.0
        return image

    def with_labels(self, classes: list[int]) -> LabeledImages:
        """The images whose label is in ``classes`` (in their order); a label the data lacks is an error."""
        missing = sorted(set(classes) - set(np.unique(self.labels).tolist()))
        if missing:
            raise ValueError(f"dataset.classes has labels the data does not: {missing}")
        keep = np.flatnonzero(np.isin(self.labels, classes))
        if isinstance(self._images, torch.Tensor):
            images = self._images[torch.as_tensor(keep)]
        else:
            images = Subset(self._images, keep.tolist())
        return LabeledImages(images, self.labels[keep])

    def uint8(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """The images at ``indices`` as uint8 N x C x H x W (for FID and grids)."""
        batch = torch.stack([self[int(i)] for i in indices])
        return ((batch + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def load_image_dataset(
    name: str,
    root: str | Path,
    *,
    train: bool,
    download: bool | Literal["auto"] = False,
    image_size: int | None = None,
    label_attribute: str | None = None,
    channels: int = 3,
) -> LabeledImages:
    """Load a torchvision dataset (train or test split) as :class:`LabeledImages`.

    ``download``: ``"auto"`` uses the files under ``root`` when they are there and
    downloads them with torchvision when they are not; ``True`` always lets
    torchvision check and download; ``False`` never downloads.

    Fashion-MNIST and CIFAR-10 are held in memory as uint8 tensors; CelebA is read
    lazily, center-cropped to 140 px and resized to ``image_size``, and labelled by
    the binary attribute ``label_attribute``. ``image_folder`` reads
    ``root/train`` or ``root/test`` with one subfolder per label (torchvision's
    ``ImageFolder``), lazily, center-cropped to a square and resized to
    ``image_size``, as RGB (or grayscale with ``channels=1``).
    """
    if name == IMAGE_FOLDER:
        return _load_image_folder(Path(root).expanduser().resolve(), train, image_size, channels)
    if name not in _TORCHVISION:
        raise ValueError(f"dataset.name={name!r} is not supported; choose one of {SUPPORTED_DATASETS}")
    root = Path(root).expanduser().resolve()
    if download == "auto":
        try:
            return _load_torchvision(name, root, train, False, image_size, label_attribute)
        except DatasetNotFoundError:
            return _download_once(name, root, train, image_size, label_attribute)
    return _load_torchvision(name, root, train, bool(download), image_size, label_attribute)


def _download_once(
    name: str, root: Path, train: bool, image_size: int | None, label_attribute: str | None
) -> LabeledImages:
    """``dataset.download=auto`` with the files missing: download them, one process at a time.

    Simulated clients share the root; a lock keeps them from writing the same files at once.
    """
    from filelock import FileLock

    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / ".feddm-download.lock")):
            return _load_torchvision(name, root, train, True, image_size, label_attribute)
    except (OSError, RuntimeError) as err:  # offline: URLError is an OSError
        reason = " ".join(str(err.__cause__ or err).split())  # torchvision's, on one line
        raise DatasetNotFoundError(
            f"{name} is not in {root} (torchvision looks for {root / _TORCHVISION[name][1]}) and "
            f"dataset.download=auto could not download it there ({reason}). Put the files there, set "
            "dataset.root=PATH to a folder that holds them, or run once where the download works."
        ) from err


def _load_torchvision(
    name: str, root: Path, train: bool, download: bool, image_size: int | None, label_attribute: str | None
) -> LabeledImages:
    dataset_cls, expected = _TORCHVISION[name]
    try:
        if name == "celeba":
            return _load_celeba(root, train, download, image_size, label_attribute)
        source = dataset_cls(root=str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found ..."
        raise DatasetNotFoundError(
            f"{name} not found in {root} (torchvision looks for {root / expected}). "
            f"Set dataset.download=true (or auto) to download it there, or dataset.root=PATH to a "
            f"folder that already holds it. ({err})"
        ) from err
    images = torch.as_tensor(np.asarray(source.data), dtype=torch.uint8)
    if images.ndim == 3:  # N x H x W grayscale
        images = images.unsqueeze(1)
    else:  # N x H x W x C
        images = images.permute(0, 3, 1, 2).contiguous()
    return LabeledImages(images, np.asarray(source.targets))


def _load_celeba(
    root: Path,
    train: bool,
    download: bool,
    image_size: int | None,
    label_attribute: str | None,
) -> LabeledImages:
    if image_size is None or label_attribute is None:
        raise ValueError("celeba needs dataset.image_size and dataset.label_attribute")
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.CenterCrop(140),
            v2.Resize(image_size, antialias=True),
        ]
    )
    source = torchvision.datasets.CelebA(
        root=str(root),
        split="train" if train else "test",
        target_type="attr",
        transform=transform,
        download=download,
    )
    names = [n for n in source.attr_names if n]
    if label_attribute not in names:
        raise ValueError(
            f"dataset.label_attribute={label_attribute!r} is not a CelebA attribute; choose one of {names}"
        )
    labels = source.attr[:, names.index(label_attribute)].numpy()
    return LabeledImages(source, labels)


def dataset_from_config(
    spec: Mapping[str, Any],
    *,
    train: bool,
    root: str | Path | None = None,
    download: bool | Literal["auto"] | None = None,
) -> LabeledImages:
    """:func:`load_image_dataset` with the keys of a ``dataset`` config group (``conf/dataset``)."""
    # The config sends every key (conf/schema.py); a spec without one gets load_image_dataset's default.
    options = {
        key: spec[key] for key in ("download", "image_size", "label_attribute", "channels") if key in spec
    }
    if download is not None:
        options["download"] = download
    images = load_image_dataset(spec["name"], spec["root"] if root is None else root, train=train, **options)
    classes = spec.get("classes")
    return images.with_labels([int(c) for c in classes]) if classes else images


class _SquareResize:
    """Center-crop to the shorter side, then resize: any image becomes size x size."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        side = min(image.shape[-2:])
        return v2.functional.resize(
            v2.functional.center_crop(image, [side, side]), [self.size, self.size], antialias=True
        )


def _load_image_folder(root: Path, train: bool, image_size: int | None, channels: int) -> LabeledImages:
    split = root / ("train" if train else "test")
    if image_size is None:
        raise ValueError("image_folder needs dataset.image_size")
    if not split.is_dir():
        raise DatasetNotFoundError(
            f"image_folder: {split} does not exist. Lay the images out as {root}/train/<label>/*.png "
            f"and {root}/test/<label>/*.png (one subfolder per label; a single subfolder is fine), "
            "or set dataset.root=PATH to such a folder."
        )
    mode = torchvision.io.ImageReadMode.GRAY if channels == 1 else torchvision.io.ImageReadMode.RGB
    source = torchvision.datasets.ImageFolder(
        str(split),
        loader=lambda path: torchvision.io.decode_image(path, mode=mode),
        transform=_SquareResize(image_size),
        allow_empty=False,
    )
    return LabeledImages(source, np.asarray(source.targets))
