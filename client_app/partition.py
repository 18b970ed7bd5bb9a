"""Split a dataset's indices across clients with flwr-datasets partitioners.

The partitioners work on a Hugging Face ``datasets.Dataset``; we give them a
two-column table (label, index) and map the chosen rows back to image indices,
so the images themselves stay in the torchvision dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

# Each partition option's settings (conf/schema.py) as the partitioner's arguments. A missing one takes
# the partitioner's default: the server always sends the schema's, so the code keeps no defaults of its own.
_ARGUMENTS = {
    "dirichlet": {
        "alpha": ("alpha", float),
        "min_partition_size": ("min_partition_size", int),
        "self_balancing": ("self_balancing", bool),
    },
    "pathological": {
        "classes_per_client": ("num_classes_per_partition", int),
        "class_assignment_mode": ("class_assignment_mode", str),
    },
}
PARTITION_SCHEMES = ("iid", *_ARGUMENTS)


def build_partitioner(partition: Mapping[str, Any], num_partitions: int, seed: int) -> Partitioner:
    """The flwr-datasets partitioner named by ``partition['name']`` (``conf.schema.PARTITIONS``)."""
    name = partition.get("name")
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name not in _ARGUMENTS:
        raise ValueError(f"partition={name!r} is unknown; choose one of {PARTITION_SCHEMES}")
    arguments = {
        arg: cast(partition[key]) for key, (arg, cast) in _ARGUMENTS[name].items() if key in partition
    }
    factory = DirichletPartitioner if name == "dirichlet" else PathologicalPartitioner
    return factory(num_partitions=num_partitions, partition_by="label", seed=seed, **arguments)


def partition_indices(
    labels: np.ndarray,
    partition: Mapping[str, Any],
    *,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> np.ndarray:
    """Indices (into the dataset behind ``labels``) of client ``partition_id``'s images.

    The table is shuffled with ``seed`` first, as ``flwr_datasets.FederatedDataset``
    does, so IID shards do not follow the file order. Every client computes the
    same split from the same labels and seed; the partitions are disjoint.
    """
    return indices_of(loaded_partitioner(labels, partition, num_partitions, seed), partition_id)


def indices_of(partitioner: Partitioner, partition_id: int) -> np.ndarray:
    """The sorted image indices of one partition of a :func:`loaded_partitioner`."""
    num_partitions = partitioner.num_partitions
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1} "
            f"(num-partitions={num_partitions})"
        )
    # Read the column through Arrow: as Python ints (the default format) it takes seconds for 30 000 images.
    return np.sort(partitioner.load_partition(partition_id).with_format("arrow")["index"].to_numpy())


def partition_sizes(
    labels: np.ndarray, partition: Mapping[str, Any], *, num_partitions: int, seed: int
) -> list[int]:
    """The number of images of each partition, as ``partition_indices`` splits them (one partitioner for all)."""
    partitioner = loaded_partitioner(labels, partition, num_partitions, seed)
    return [len(partitioner.load_partition(pid)) for pid in range(num_partitions)]


def loaded_partitioner(
    labels: np.ndarray, partition: Mapping[str, Any], num_partitions: int, seed: int
) -> Partitioner:
    """The partitioner over a seeded shuffle of ``labels``; it splits all partitions at its first load.

    Keep it to read several partitions: with 1000 Dirichlet partitions the split
    itself costs far more than reading one partition.
    """
    if num_partitions > len(labels):
        raise ValueError(f"num-partitions={num_partitions} is more than the {len(labels)} images")
    # Shuffle in NumPy: a shuffled `datasets.Dataset` carries an index mapping that
    # makes the partitioners' column reads slow.
    order = np.random.default_rng(seed).permutation(len(labels))
    table = datasets.Dataset.from_dict({"label": np.asarray(labels, dtype=np.int64)[order], "index": order})
    partitioner = build_partitioner(partition, num_partitions, seed)
    partitioner.dataset = table
    return partitioner


def split_train_holdout(
    indices: np.ndarray, holdout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's indices into (train, held-out) with a seeded permutation."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    shuffled = np.random.default_rng(seed).permutation(indices)
    num_holdout = int(round(len(indices) * holdout_fraction))
    if holdout_fraction > 0 and len(indices) > 1:
        num_holdout = max(num_holdout, 1)
    return np.sort(shuffled[num_holdout:]), np.sort(shuffled[:num_holdout])
