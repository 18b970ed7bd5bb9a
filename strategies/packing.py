"""Whole fp32 models on the wire as three arrays: ``@names``, ``@shapes`` and ``@fp32``.

Flower 1.42 moves a message as one request per array (and per 5 MB chunk) on
every hop: ServerApp -> SuperLink -> SuperNode -> ClientApp process and back.
The tiny UNet's 114 tensors made about 230 requests per hop, which took most of
a deployment round's fixed cost on 2 CPU cores (``benchmarks/flower_overhead``).
Packed, the same float32 numbers travel as one names array, one shapes array
and one values array, so a message is a handful of requests. Codes
(``strategies.codec``, ``strategies.sparse``) already travel in a few arrays
and are left as they are.

The server packs the fp32 records it sends and asks clients to pack their fp32
replies (``PACK_KEY`` in the config); either side unpacks whatever arrives
packed, and a malformed packed payload is a ``PayloadError`` naming what is
wrong (a reply is then left out with that reason). The values are bit for bit
those of the unpacked arrays; only the layout differs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.codec import NAMES_KEY, PayloadError, load_array, load_names, names_array

SHAPES_KEY = "@shapes"  # int64: for each array, its number of dimensions, then its dimensions
VALUES_KEY = "@fp32"  # float32: every array's values, flattened, concatenated in name order
PACKED_KEYS = (NAMES_KEY, SHAPES_KEY, VALUES_KEY)
PACK_KEY = "pack-arrays"  # ConfigRecord key: the server reads packed fp32 replies
_MAX_NDIM = 8


def can_pack(record: ArrayRecord) -> bool:
    """Whether ``record`` is plain float32 arrays (not codes, not empty, not packed already)."""
    return len(record) > 0 and all(not k.startswith("@") and a.dtype == "float32" for k, a in record.items())


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is in the packed layout (it may still be malformed)."""
    return VALUES_KEY in record or SHAPES_KEY in record


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """``record``'s float32 arrays as names, shapes and one values array (see the module docstring)."""
    if not can_pack(record):
        raise ValueError("only non-empty records of float32 arrays are packed")
    names = sorted(record.keys())
    arrays = [record[name].numpy() for name in names]
    shapes = np.array([d for a in arrays for d in (a.ndim, *a.shape)], dtype=np.int64)
    values = np.concatenate([a.reshape(-1) for a in arrays])
    return ArrayRecord({NAMES_KEY: names_array(names), SHAPES_KEY: Array(shapes), VALUES_KEY: Array(values)})


def packed_if_asked(record: ArrayRecord, config: Mapping[str, Any]) -> ArrayRecord:
    """A client's reply arrays as sent: packed when the server asked (``PACK_KEY``) and they are fp32."""
    return pack_arrays(record) if config.get(PACK_KEY) and can_pack(record) else record


def unpack_arrays(record: ArrayRecord, order: Iterable[str] = ()) -> ArrayRecord:
    """The arrays of a packed ``record``; ``PayloadError`` if it is malformed.

    They come in the order of ``order`` (e.g. the global model's), then the rest sorted by name.
    """
    unexpected = sorted(set(record.keys()) - set(PACKED_KEYS))
    if unexpected:
        raise PayloadError(f"unexpected array(s) in a packed payload: {', '.join(unexpected[:5])}")
    names = load_names(record, NAMES_KEY)
    shapes = _load_shapes(record, len(names))
    values = load_array(record, VALUES_KEY) if VALUES_KEY in record else None
    if values is None or values.dtype != np.float32 or values.ndim != 1:
        found = "nothing" if values is None else f"{values.dtype}{list(values.shape)}"
        raise PayloadError(f"{VALUES_KEY!r} is {found}, expected 1-D float32")
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != values.size:
        raise PayloadError(
            f"{VALUES_KEY!r} holds {values.size} values, the shapes of its {len(names)} arrays {sum(sizes)}"
        )
    ends = np.cumsum(sizes)
    arrays = {
        name: Array(values[end - size : end].reshape(shape))
        for name, shape, size, end in zip(names, shapes, sizes, ends)
    }
    first = [name for name in order if name in arrays]
    ordered = dict.fromkeys([*first, *names])  # order's names first, then the rest sorted, each once
    return ArrayRecord({name: arrays[name] for name in ordered})


def unpacked(record: ArrayRecord, order: Iterable[str] = ()) -> ArrayRecord:
    """``record`` itself, or its arrays if it is packed (in ``order``, see ``unpack_arrays``)."""
    return unpack_arrays(record, order) if is_packed(record) else record


def _load_shapes(record: ArrayRecord, count: int) -> list[tuple[int, ...]]:
    """The ``count`` shapes of ``SHAPES_KEY``: each its number of dimensions, then the dimensions."""
    if SHAPES_KEY not in record:
        raise PayloadError(f"the packed payload has no {SHAPES_KEY!r} array")
    raw = load_array(record, SHAPES_KEY)
    if raw.dtype != np.int64 or raw.ndim != 1:
        raise PayloadError(f"{SHAPES_KEY!r} is {raw.dtype}{list(raw.shape)}, expected 1-D int64")
    shapes, at = [], 0
    for index in range(count):
        ndim = int(raw[at]) if at < raw.size else -1
        dims = raw[at + 1 : at + 1 + ndim] if ndim >= 0 else raw[:0]
        if not 0 <= ndim <= _MAX_NDIM or len(dims) != ndim or (dims < 0).any():
            raise PayloadError(f"{SHAPES_KEY!r} does not describe array {index} ({ndim} dimensions at {at})")
        shapes.append(tuple(int(d) for d in dims))
        at += 1 + ndim
    if at != raw.size:
        raise PayloadError(f"{SHAPES_KEY!r} describes more than the {count} named arrays")
    return shapes


__all__ = [
    "PACK_KEY",
    "SHAPES_KEY",
    "VALUES_KEY",
    "can_pack",
    "is_packed",
    "pack_arrays",
    "unpack_arrays",
    "unpacked",
]
