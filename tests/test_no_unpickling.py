"""Nothing received over the network or read from a run folder is unpickled."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.accounting import check_full_weights
from strategies.codec import CODES_KEY, PayloadError, decode_arrays, encode_arrays
from tests.conftest import REPO_ROOT

SOURCES = [
    p
    for folder in ("models", "client_app", "server_app", "strategies", "feddm", "benchmarks", "docker")
    for p in (REPO_ROOT / folder).rglob("*.py")
]
UNSAFE = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b", re.M), "a pickle library"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
]


def test_sources_use_no_unpickling_loader():
    assert len(SOURCES) > 20
    for path in SOURCES:
        text = path.read_text()
        for pattern, what in UNSAFE:
            if pattern.search(text):
                pytest.fail(f"{path.relative_to(REPO_ROOT)} uses {what}")


def _pickled_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"payload": "object"}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def test_a_pickled_array_in_a_reply_is_refused_not_loaded():
    reference = ArrayRecord({"w": Array(np.zeros(1, np.float32))})
    pickled = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=_pickled_npy())
    with pytest.raises(PayloadError, match="cannot be decoded"):
        check_full_weights(ArrayRecord({"w": pickled}), reference)
    record, _ = encode_arrays({"w": np.ones((2, 2), np.float32)})
    tampered = ArrayRecord({**dict(record.items()), CODES_KEY: pickled})
    with pytest.raises(PayloadError, match="could not be deserialized"):
        decode_arrays(tampered, {"w": ((2, 2), "float32")})
