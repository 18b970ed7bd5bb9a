"""What a fresh ClientApp process pays before it trains (a SuperNode starts one per message in Flower 1.42).

It imports only what a client needs, and reads its data split from the node's
disk after the first process computed it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import client_app.partition
from client_app import task
from tests.conftest import REPO_ROOT

# Libraries the client path does not need: each costs a ClientApp process tenths of a second or more to import.
NOT_IMPORTED = (
    "flwr_datasets",
    "datasets",
    "pandas",
    "matplotlib",
    "seaborn",
    "torchmetrics",
    "ray",
    "server_app",
)


def test_clientapp_import_leaves_out_what_clients_do_not_need():
    code = f"import sys, client_app.app; print([m for m in {NOT_IMPORTED!r} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def _split_args(data_root, cache_dir, partition=None, partition_id=1):
    spec = {
        "name": "fashion_mnist",
        "root": str(data_root),
        "download": False,
        "image_size": 28,
        "channels": 1,
    }
    dataset_key = (json.dumps(spec, sort_keys=True), str(data_root))
    partition_json = json.dumps(partition or {"name": "dirichlet", "alpha": 0.5}, sort_keys=True)
    return dataset_key, partition_json, partition_id, 3, 7, 0.1, str(cache_dir)


def test_split_is_kept_on_disk_and_read_back(data_root, tmp_path, monkeypatch):
    args = _split_args(data_root, tmp_path)
    task._split.cache_clear()
    train, holdout = task._split(*args)
    fresh = client_app.partition.partition_indices(
        task._dataset(*args[0]).labels, json.loads(args[1]), partition_id=1, num_partitions=3, seed=7
    )
    assert np.array_equal(np.sort(np.concatenate([train, holdout])), fresh)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_partitioning(*_args, **_kwargs):
        raise AssertionError("partitioned again although the split is on disk")

    monkeypatch.setattr(client_app.partition, "indices_of", no_partitioning)
    task._split.cache_clear()  # a new ClientApp process
    again = task._split(*args)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], holdout)
    assert again[0].dtype == train.dtype == np.int64

    other = _split_args(data_root, tmp_path, partition_id=2)  # another partition: another file
    monkeypatch.undo()
    task._split(*other)
    assert len(list(tmp_path.glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", [b"", b"not a zip file"])
def test_damaged_split_file_is_split_anew(data_root, tmp_path, damage):
    args = _split_args(data_root, tmp_path, partition={"name": "iid"})
    task._split.cache_clear()
    train, holdout = task._split(*args)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(damage)
    task._split.cache_clear()
    again = task._split(*args)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], holdout)
    assert path.stat().st_size > 1000  # rewritten whole


def test_unwritable_cache_only_warns(data_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = _split_args(data_root, blocker / "splits", partition={"name": "iid"})  # under a file: cannot mkdir
    task._split.cache_clear()
    train, holdout = task._split(*args)
    assert len(train) + len(holdout) == 20000
    task._split.cache_clear()
