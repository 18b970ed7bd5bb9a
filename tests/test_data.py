"""Datasets and flwr-datasets partitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client_app.partition import partition_indices, split_train_holdout
from models import DatasetNotFoundError, load_image_dataset

LABELS = np.repeat(np.arange(10), 100)  # 1000 images, 10 classes


def _all_partitions(partition, n=4, seed=0):
    return [
        partition_indices(LABELS, partition, partition_id=i, num_partitions=n, seed=seed) for i in range(n)
    ]


@pytest.mark.parametrize(
    "partition", [{"name": "iid"}, {"name": "dirichlet", "alpha": 0.3, "min_partition_size": 5}]
)
def test_partitions_are_disjoint_and_cover_the_data(partition):
    parts = _all_partitions(partition)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(LABELS)
    assert all(len(p) > 0 for p in parts)


def test_iid_partitions_are_balanced_and_mixed():
    for part in _all_partitions({"name": "iid"}):
        assert len(part) == 250
        assert len(np.unique(LABELS[part])) == 10


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    def skew(alpha):
        parts = _all_partitions({"name": "dirichlet", "alpha": alpha, "min_partition_size": 5})
        shares = [np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]
        return np.mean(shares)

    assert skew(0.05) > skew(100.0) + 0.2


def test_pathological_gives_each_client_k_classes_disjointly():
    parts = _all_partitions(
        {"name": "pathological", "classes_per_client": 2, "class_assignment_mode": "deterministic"}
    )
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))
    assert all(len(np.unique(LABELS[p])) == 2 for p in parts)


def test_partitions_are_reproducible_and_seed_dependent():
    a = _all_partitions({"name": "iid"}, seed=1)
    b = _all_partitions({"name": "iid"}, seed=1)
    c = _all_partitions({"name": "iid"}, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_bad_partition_requests_name_the_problem():
    with pytest.raises(ValueError, match="partition-id 4"):
        partition_indices(LABELS, {"name": "iid"}, partition_id=4, num_partitions=4, seed=0)
    with pytest.raises(ValueError, match="more than the 1000 images"):
        partition_indices(LABELS, {"name": "iid"}, partition_id=0, num_partitions=2000, seed=0)
    with pytest.raises(ValueError, match="unknown"):
        partition_indices(LABELS, {"name": "bogus"}, partition_id=0, num_partitions=2, seed=0)


def test_holdout_split_is_disjoint():
    train, held = split_train_holdout(np.arange(100), 0.1, seed=0)
    assert len(held) == 10 and len(train) == 90
    assert not set(train) & set(held)


def test_fashion_mnist_loads_scaled_to_minus_one_one(data_root):
    train = load_image_dataset("fashion_mnist", data_root, train=True)
    test = load_image_dataset("fashion_mnist", data_root, train=False)
    assert len(train) == 60000 and len(test) == 10000
    image = train[0]
    assert image.shape == (1, 28, 28)
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.min() < 0 < image.max()
    assert set(np.unique(train.labels)) == set(range(10))
    assert train.uint8([0]).dtype.is_floating_point is False


def test_missing_dataset_names_the_path_and_the_download_option(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_image_dataset("fashion_mnist", tmp_path / "nowhere", train=True)
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "dataset.download=true" in str(err.value)


def test_download_auto_uses_the_files_that_are_there(data_root, monkeypatch):
    import torchvision

    def offline(self):
        raise OSError("offline")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    train = load_image_dataset("fashion_mnist", data_root, train=True, download="auto")
    assert len(train) == 60000


def test_download_auto_offline_and_missing_names_the_path_and_the_option(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def offline(self):
        calls.append(self.root)
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    with pytest.raises(DatasetNotFoundError) as err:
        load_image_dataset("fashion_mnist", tmp_path / "nowhere", train=True, download="auto")
    message = str(err.value)
    assert calls, "auto must try the download when the files are missing"
    assert str(tmp_path / "nowhere") in message and "dataset.download=auto" in message
    assert "Name or service not known" in message and "dataset.root=PATH" in message


def _image_folder(root, sizes):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, labels in (("train", ("church", "tower")), ("test", ("church",))):
        for label in labels:
            (root / split / label).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / split / label / f"{i}.png"
                )


def test_image_folder_loads_square_images_with_folder_labels(tmp_path):
    from models.data import dataset_from_config

    _image_folder(tmp_path, [(80, 60), (50, 70), (64, 64)])
    spec = {"name": "image_folder", "root": str(tmp_path), "image_size": 32, "channels": 3}
    train = dataset_from_config(spec, train=True)
    assert len(train) == 6 and sorted(set(train.labels.tolist())) == [0, 1]
    image = train[4]
    assert image.shape == (3, 32, 32) and -1.0 <= image.min() and image.max() <= 1.0
    assert train.uint8([0, 1]).dtype == torch.uint8
    gray = dataset_from_config(spec | {"channels": 1}, train=False)
    assert len(gray) == 3 and gray[0].shape == (1, 32, 32)


def test_image_folder_without_its_split_names_the_layout(tmp_path):
    from models.data import DatasetNotFoundError, dataset_from_config

    with pytest.raises(DatasetNotFoundError, match=r"train/<label>/\*.png"):
        dataset_from_config({"name": "image_folder", "root": str(tmp_path), "image_size": 32}, train=True)


def test_dataset_classes_keeps_those_labels_in_both_splits(data_root):
    from models.data import dataset_from_config

    spec = {"name": "fashion_mnist", "root": str(data_root), "classes": [5, 7]}
    for train in (True, False):
        full = dataset_from_config({**spec, "classes": None}, train=train)
        kept = dataset_from_config(spec, train=train)
        assert set(np.unique(kept.labels)) == {5, 7} and len(kept) == int(np.isin(full.labels, [5, 7]).sum())
        assert torch.equal(
            kept.uint8([0]), full.uint8([int(np.flatnonzero(np.isin(full.labels, [5, 7]))[0])])
        )
    with pytest.raises(ValueError, match=r"dataset.classes has labels the data does not: \[12\]"):
        dataset_from_config({**spec, "classes": [5, 12]}, train=False)
