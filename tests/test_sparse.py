"""Top-k sparsification (``strategies/sparse.py``): selection, layout, error feedback, bytes, hostile payloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from client_app.updates import RESIDUAL_KEY, quantized_update
from strategies.codec import BITS_KEY, SCALES_KEY, PayloadError, payload_nbytes
from strategies.sparse import (
    BITMAP_KEY,
    INDICES_KEY,
    TOPK_KEY,
    TOPK_KEYS,
    VALUES_KEY,
    decode_topk,
    encode_topk,
    is_topk,
    keep_count,
    top_indices,
)


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(8,)).astype(np.float32),
        "fc.weight": rng.normal(size=(10, 30)).astype(np.float32),
        "scalar": np.asarray(0.5, dtype=np.float32),
    }


def _reference(arrays):
    return {n: (tuple(np.shape(a)), "float32") for n, a in arrays.items()}


def test_keep_count_is_the_ceiling_of_the_fraction_and_at_least_one():
    assert keep_count(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001 in floats
    assert keep_count(101, 0.07) == 8
    assert keep_count(10, 0.01) == 1 and keep_count(1, 0.5) == 1
    assert keep_count(1000, 0.999) == 999


def test_top_indices_are_the_largest_magnitudes_with_ties_to_the_lower_position():
    flat = np.array([0.5, -3.0, 1.0, -1.0, 1.0, 2.0], dtype=np.float32)
    assert top_indices(flat, 2).tolist() == [1, 5]
    assert top_indices(flat, 3).tolist() == [1, 2, 5]  # |1.0| three times: the lowest position wins
    assert top_indices(flat, 4).tolist() == [1, 2, 3, 5]
    assert top_indices(flat, 6).tolist() == list(range(6))


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_float32_round_trip_sends_exactly_the_k_largest_and_the_residual_completes_it(fraction):
    arrays = _arrays()
    record, residuals = encode_topk(arrays, fraction, values="float32")
    assert is_topk(record) and record[VALUES_KEY].dtype == "float32"
    decoded = decode_topk(record, _reference(arrays), fraction, values="float32")
    assert list(decoded) == list(arrays)
    for name, x in arrays.items():
        sent = np.flatnonzero(decoded[name].reshape(-1))
        k = keep_count(x.size, fraction)
        assert sent.size == k
        # every sent magnitude is at least every unsent one
        unsent = np.delete(np.abs(x.reshape(-1)), sent)
        assert np.abs(x.reshape(-1)[sent]).min() >= unsent.max(initial=0)
        np.testing.assert_array_equal(decoded[name].reshape(-1)[sent], x.reshape(-1)[sent])
        np.testing.assert_array_equal(residuals[name] + decoded[name], x)  # exact
        assert decoded[name].shape == x.shape and decoded[name].dtype == np.float32


@pytest.mark.parametrize("bits", [8, 4, 1])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantized_values_round_trip_within_half_a_step(bits, stochastic):
    arrays = _arrays()
    record, residuals = encode_topk(
        arrays, 0.2, values="quantized", bits=bits, stochastic=stochastic, rng=np.random.default_rng(3)
    )
    assert SCALES_KEY in record and (BITS_KEY in record) == (bits <= 4)
    assert tuple(record[SCALES_KEY].shape) == (len(arrays),)  # one scale per tensor
    decoded = decode_topk(record, _reference(arrays), 0.2, values="quantized")
    for name, x in arrays.items():
        np.testing.assert_allclose(residuals[name] + decoded[name], x, rtol=0, atol=1e-6)
        if bits == 8 and not stochastic:
            sent = np.flatnonzero(decoded[name].reshape(-1))
            step = np.abs(x).max() / 127
            assert np.abs(decoded[name].reshape(-1)[sent] - x.reshape(-1)[sent]).max() <= step / 2 + 1e-7
    again, _ = encode_topk(
        arrays, 0.2, values="quantized", bits=bits, stochastic=stochastic, rng=np.random.default_rng(3)
    )
    assert again[VALUES_KEY].numpy().tobytes() == record[VALUES_KEY].numpy().tobytes()


def test_positions_travel_as_gaps_or_a_bitmap_whichever_is_smaller():
    x = {"w": np.random.default_rng(0).normal(size=(64, 1024)).astype(np.float32)}
    sparse, _ = encode_topk(x, 0.01, values="float32")
    dense, _ = encode_topk(x, 0.2, values="float32")
    assert sorted(sparse.keys()) == sorted([TOPK_KEY, INDICES_KEY, VALUES_KEY])
    assert sparse[INDICES_KEY].dtype == "uint16"  # gaps of 1 % of 65536 entries fit 16 bits
    assert sorted(dense.keys()) == sorted([TOPK_KEY, BITMAP_KEY, VALUES_KEY])
    for record, fraction in ((sparse, 0.01), (dense, 0.2)):
        decoded = decode_topk(record, _reference(x), fraction)
        assert np.count_nonzero(decoded["w"]) == keep_count(x["w"].size, fraction)
    far = {"w": np.zeros(100_000, dtype=np.float32)}
    far["w"][[3, 99_000]] = 1.0  # a gap of 98997 needs uint32
    record, _ = encode_topk(far, 2e-5, values="float32")
    assert record[INDICES_KEY].dtype == "uint32"
    np.testing.assert_array_equal(decode_topk(record, _reference(far), 2e-5)["w"], far["w"])


def test_one_percent_is_at_least_30x_smaller_than_fp32():
    x = {"w": np.random.default_rng(0).normal(size=(256, 128, 3, 3)).astype(np.float32)}
    fp32 = payload_nbytes(ArrayRecord({"w": Array(x["w"])}))
    floats, _ = encode_topk(x, 0.01, values="float32")
    codes, _ = encode_topk(x, 0.01, values="quantized", bits=8)
    assert fp32 / payload_nbytes(floats) >= 30
    assert fp32 / payload_nbytes(codes) >= 60


def test_error_feedback_sends_everything_once_updates_stop():
    arrays = _arrays()
    total = {n: np.zeros_like(a) for n, a in arrays.items()}
    pending = dict(arrays)
    rounds = max(-(-a.size // keep_count(a.size, 0.1)) for a in arrays.values())
    for _ in range(rounds):  # no new update after the first: only the residual travels
        record, pending = encode_topk(pending, 0.1, values="float32")
        for name, value in decode_topk(record, _reference(arrays), 0.1).items():
            total[name] += value
    for name, x in arrays.items():
        np.testing.assert_array_equal(total[name], x)
        assert not pending[name].any()


def test_client_error_feedback_with_topk_converges_to_the_sum_of_the_updates():
    # Through the client's path: the residual lives in the state under RESIDUAL_KEY.
    torch.manual_seed(0)
    received = {n: torch.from_numpy(a) for n, a in _arrays(1).items()}
    update = {n: 0.01 * torch.randn_like(t) for n, t in received.items()}
    config = {
        "quant-bits": 8,
        "quant-granularity": "channel",
        "quant-stochastic": False,
        "quant-error-feedback": True,
        "quant-topk": 0.1,
        "quant-topk-values": "quantized",
    }
    state, sent = RecordDict(), {n: np.zeros(t.shape, np.float32) for n, t in received.items()}
    reference = {n: (tuple(t.shape), "float32") for n, t in received.items()}
    for round_ in range(40):
        local = {n: received[n] + update[n] if round_ == 0 else received[n] for n in received}
        record = quantized_update(local, received, config, state, seed=round_)
        for name, value in decode_topk(record, reference, 0.1, values="quantized").items():
            sent[name] += value
    assert RESIDUAL_KEY in state
    for name, delta in update.items():
        residual = state[RESIDUAL_KEY][name].numpy()
        np.testing.assert_allclose(sent[name] + residual, delta.numpy(), rtol=0, atol=1e-6)
        assert np.abs(residual).max() <= 1e-3 * np.abs(delta.numpy()).max()  # nearly all sent


def test_encode_rejects_reserved_names_bad_fractions_and_non_finite_values():
    x = np.ones(4, dtype=np.float32)
    for name in (*TOPK_KEYS, SCALES_KEY, "a\nb"):
        with pytest.raises(ValueError, match="reserved"):
            encode_topk({name: x}, 0.5)
    for fraction in (0, 1, -0.1, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            encode_topk({"w": x}, fraction)
    with pytest.raises(ValueError, match="values"):
        encode_topk({"w": x}, 0.5, values="int4")
    with pytest.raises(ValueError, match="non-finite"):
        encode_topk({"w": np.array([1.0, np.nan], np.float32)}, 0.5)


def _payload(values="float32", fraction=0.05, bits=8):
    arrays = _arrays()
    record, _ = encode_topk(arrays, fraction, values=values, bits=bits)
    return {k: a.numpy().copy() for k, a in record.items()}, _reference(arrays)


def _names(*names):
    return np.frombuffer("\n".join(names).encode(), dtype=np.uint8).copy()


def _hostile(how):
    """A top-k payload broken in one way, the fraction and values asked for, and what the error must say."""
    fraction = 0.5 if how.startswith("bitmap") else 0.05  # 1/16 and below: gaps
    values = "quantized" if how in ("zero-scale", "scales-length", "bad-bits", "overflow") else "float32"
    payload, reference = _payload(values, fraction, bits=4 if how == "bad-bits" else 8)
    ref = sorted(reference)
    match = {
        "no-marker": "not a top-k record",
        "no-values": "'@values' is missing",
        "extra-key": "unexpected array.*extra",
        "both-positions": "exactly one of",
        "names-unsorted": "not sorted and distinct",
        "names-missing": "'scalar' is missing",
        "names-unknown": "unexpected array.*bogus",
        "names-not-utf8": "not UTF-8",
        "indices-dtype": "'@indices' is int64",
        "indices-length": r"'@indices' is uint16\[",
        "duplicate": "not strictly increasing",
        "out-of-range": "out of range",
        "bitmap-count": "marks .* entries of array",
        "bitmap-padding": "non-zero padding",
        "bitmap-length": r"'@bitmap' is uint8\[",
        "values-dtype": "'@values' is float64",
        "values-length": r"expected float32\[",
        "non-finite": "non-finite",
        "quantized-asked": "holds float32 values, but quantized values were asked for",
        "zero-scale": "scale for array 'conv.bias' is not finite and positive",
        "scales-length": "one scale per array",
        "bad-bits": "'@bits' is uint8",
        "overflow": "decodes to non-finite values",
    }[how]
    if how == "no-marker":
        del payload[TOPK_KEY]
    elif how == "no-values":
        del payload[VALUES_KEY]
    elif how == "extra-key":
        payload["extra"] = np.zeros(1, np.float32)
    elif how == "both-positions":
        payload[BITMAP_KEY] = np.zeros(1, np.uint8)
    elif how == "names-unsorted":
        payload[TOPK_KEY] = _names(*reversed(ref))
    elif how == "names-missing":
        payload[TOPK_KEY] = _names(*ref[:-1])
    elif how == "names-unknown":
        payload[TOPK_KEY] = _names(*ref, "zz.bogus")
        match = "unexpected array.*zz.bogus"
    elif how == "names-not-utf8":
        payload[TOPK_KEY] = np.array([0xFF, 0xFE], np.uint8)
    elif how == "indices-dtype":
        payload[INDICES_KEY] = payload[INDICES_KEY].astype(np.int64)
    elif how == "indices-length":
        payload[INDICES_KEY] = payload[INDICES_KEY][:-1].copy()
    elif how == "duplicate":
        payload[INDICES_KEY][2] = 0  # conv.weight's second gap (conv.bias sends 1): a position twice
    elif how == "out-of-range":
        payload[INDICES_KEY][0] = 8  # conv.bias has 8 entries: position 8 is past its end
    elif how == "bitmap-count":
        payload[BITMAP_KEY][0] ^= 1
    elif how == "bitmap-padding":
        payload[BITMAP_KEY] = payload[BITMAP_KEY].copy()
        payload[BITMAP_KEY][-1] |= 0x80
    elif how == "bitmap-length":
        payload[BITMAP_KEY] = np.append(payload[BITMAP_KEY], np.uint8(0))
    elif how == "values-dtype":
        payload[VALUES_KEY] = payload[VALUES_KEY].astype(np.float64)
    elif how == "values-length":
        payload[VALUES_KEY] = payload[VALUES_KEY][:-1].copy()
    elif how == "non-finite":
        payload[VALUES_KEY][0] = np.inf
    elif how == "quantized-asked":
        values = "quantized"
    elif how == "zero-scale":
        payload[SCALES_KEY][0] = 0.0
    elif how == "scales-length":
        payload[SCALES_KEY] = payload[SCALES_KEY][:-1].copy()
    elif how == "bad-bits":
        payload[BITS_KEY] = np.asarray(8, np.uint8)
    elif how == "overflow":
        payload[SCALES_KEY][:] = 3e38
    return ArrayRecord({k: Array(v) for k, v in payload.items()}), reference, fraction, values, match


HOSTILE = [
    "no-marker",
    "no-values",
    "extra-key",
    "both-positions",
    "names-unsorted",
    "names-missing",
    "names-unknown",
    "names-not-utf8",
    "indices-dtype",
    "indices-length",
    "duplicate",
    "out-of-range",
    "bitmap-count",
    "bitmap-padding",
    "bitmap-length",
    "values-dtype",
    "values-length",
    "non-finite",
    "quantized-asked",
    "zero-scale",
    "scales-length",
    "bad-bits",
    "overflow",
]


@pytest.mark.parametrize("how", HOSTILE)
def test_decode_rejects_a_hostile_payload_naming_the_problem(how):
    record, reference, fraction, values, match = _hostile(how)
    with pytest.raises(PayloadError, match=match):
        decode_topk(record, reference, fraction, values=values)


def test_decode_rejects_counts_of_another_fraction():
    payload, reference = _payload("float32", 0.05)
    record = ArrayRecord({k: Array(v) for k, v in payload.items()})
    decode_topk(record, reference, 0.05)
    with pytest.raises(PayloadError, match="the counts the top-k fraction gives"):
        decode_topk(record, reference, 0.04)
