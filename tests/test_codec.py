"""Unit tests for the quantization codec (strategies/codec.py): int8 codes and packed 4-, 2- and 1-bit codes."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.codec import (
    BITS_KEY,
    CODEC_KEYS,
    CODES_KEY,
    NAMES_KEY,
    SCALES_KEY,
    PayloadError,
    QuantizedTensor,
    decode_arrays,
    dequantize,
    encode_arrays,
    is_quantized,
    names_array,
    pack_codes,
    payload_nbytes,
    quantize,
    scale_lengths,
    unpack_codes,
)

SHAPES = {
    "conv": (16, 8, 3, 3),
    "linear": (32, 64),
    "bias": (32,),
    "scalar": (),
}


PER_BYTE = {4: 2, 3: 2, 2: 4, 1: 8}


def _random_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def _reference(arrays: dict[str, np.ndarray]) -> dict:
    return {name: (x.shape, str(x.dtype)) for name, x in arrays.items()}


def _npy_size(x: np.ndarray) -> int:
    buf = BytesIO()
    np.save(buf, x, allow_pickle=False)
    return len(buf.getvalue())


def _npy_header_size(x: np.ndarray) -> int:
    return _npy_size(x) - x.nbytes


def _tamper(record: ArrayRecord, ref: dict, **changes: np.ndarray | None) -> ArrayRecord:
    """Copy ``record``, replacing (ndarray) or dropping (None) entries or one array's part of them.

    ``NAME=...`` replaces the codes of array ``NAME`` inside ``CODES_KEY`` (None: drops
    the array from the names and the codes); ``NAME__scale=...`` replaces (None: drops)
    its scales inside ``SCALES_KEY``; a codec key replaces (None: drops) that entry.
    """
    entries = {k: v for k, v in record.items()}
    names = sorted(ref)
    segments = {CODES_KEY: _segments(record, ref), SCALES_KEY: _segments(record, ref, SCALES_KEY)}
    for key, value in changes.items():
        if key in CODEC_KEYS:
            continue
        name, target = (key[: -len("__scale")], SCALES_KEY) if key.endswith("__scale") else (key, CODES_KEY)
        segments[target][name] = value
        if value is None and target == CODES_KEY:
            names.remove(name)
    entries[NAMES_KEY] = names_array(names)
    for key in (CODES_KEY, SCALES_KEY):
        entries[key] = Array(np.concatenate([p.reshape(-1) for p in segments[key].values() if p is not None]))
    for key, value in changes.items():
        if key in CODEC_KEYS:
            if value is None:
                del entries[key]
            else:
                entries[key] = Array(value)
    return ArrayRecord(entries)


def _segments(record: ArrayRecord, ref: dict, key: str = CODES_KEY) -> dict[str, np.ndarray]:
    """Each array's part of ``CODES_KEY`` (packed: whole bytes) or of ``SCALES_KEY``, split in name order."""
    per_byte = PER_BYTE[int(record[BITS_KEY].numpy())] if BITS_KEY in record else 1
    lengths = {n: -(-int(np.prod(ref[n][0], dtype=np.int64)) // per_byte) for n in ref}
    if key == SCALES_KEY:
        lengths = scale_lengths(ref, "channel")
    flat, offset, parts = record[key].numpy(), 0, {}
    for name in sorted(ref):
        parts[name] = flat[offset : offset + lengths[name]]
        offset += lengths[name]
    return parts


def _scale_bcast(q: QuantizedTensor) -> np.ndarray:
    if q.values.ndim == 0:
        return q.scale.reshape(())
    return q.scale.reshape((-1,) + (1,) * (q.values.ndim - 1))


# ---------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_nearest_round_trip_within_half_scale(name, granularity):
    x = _random_arrays()[name]
    q = quantize(x, granularity=granularity, name=name)

    assert q.values.dtype == np.int8
    assert q.values.shape == x.shape
    assert q.scale.dtype == np.float32
    assert np.all(np.abs(q.values.astype(int)) <= 127)

    err = np.abs(dequantize(q).astype(np.float64) - x)
    bound = _scale_bcast(q).astype(np.float64) / 2
    assert np.all(err <= bound * (1 + 1e-6) + 1e-12)
    # A bound that is too generous would hide bugs: the error is not trivially 0.
    if x.size > 1:
        assert err.max() > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_bound_holds_for_lower_bits(bits):
    x = _random_arrays(1)["linear"]
    q = quantize(x, bits=bits)
    qmax = 2 ** (bits - 1) - 1
    assert np.abs(q.values.astype(int)).max() == qmax
    err = np.abs(dequantize(q).astype(np.float64) - x)
    assert np.all(err <= _scale_bcast(q) / 2 * (1 + 1e-6))


def test_dequantize_returns_float32():
    q = quantize(np.arange(6, dtype=np.float64).reshape(2, 3))
    assert dequantize(q).dtype == np.float32


def test_decode_round_trip_matches_dequantize():
    arrays = _random_arrays()
    record, _ = encode_arrays(arrays)
    decoded = decode_arrays(record, _reference(arrays))
    assert list(decoded) == list(arrays)
    for name, x in arrays.items():
        assert decoded[name].shape == x.shape
        assert decoded[name].dtype == np.float32
        np.testing.assert_array_equal(decoded[name], dequantize(quantize(x)))


def test_decode_casts_to_reference_dtype():
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    record, _ = encode_arrays({"w": x})
    out = decode_arrays(record, {"w": ((3, 4), "float16")})
    assert out["w"].dtype == np.float16
    assert out["w"].shape == (3, 4)


# ---------------------------------------------------------------------------
# Byte counts
# ---------------------------------------------------------------------------


def test_payload_nbytes_is_sum_of_npy_sizes():
    arrays = _random_arrays()
    record, _ = encode_arrays(arrays)

    expected_from_record = sum(len(a.data) for _, a in record.items())
    assert payload_nbytes(record) == expected_from_record

    names = sorted(arrays)
    expected = _npy_size(np.concatenate([quantize(arrays[n]).scale for n in names]))
    expected += _npy_size(np.concatenate([quantize(arrays[n]).values.reshape(-1) for n in names]))
    expected += _npy_size(np.frombuffer("\n".join(names).encode(), dtype=np.uint8))
    assert payload_nbytes(record) == expected


def test_payload_nbytes_exact_formula():
    arrays = _random_arrays()
    record, _ = encode_arrays(arrays, granularity="channel")
    channels = sum(x.shape[0] if x.ndim >= 2 else 1 for x in arrays.values())
    scales = np.zeros((channels,), dtype=np.float32)
    expected = 4 * channels + _npy_header_size(scales)  # one packed scale array
    values = sum(x.size for x in arrays.values())
    expected += values + _npy_header_size(np.zeros(values, dtype=np.int8))  # one array of int8 codes
    names = len("\n".join(sorted(arrays)))
    expected += names + _npy_header_size(np.zeros(names, dtype=np.uint8))
    assert payload_nbytes(record) == expected
    # count_bytes additionally counts key lengths.
    keys = sum(len(k) for k in record.keys())
    assert record.count_bytes() == expected + keys


def test_int8_payload_is_about_4x_smaller_than_fp32():
    rng = np.random.default_rng(2)
    arrays = {
        "conv": rng.standard_normal((256, 128, 3, 3)).astype(np.float32),  # 294_912
        "linear": rng.standard_normal((512, 1024)).astype(np.float32),  # 524_288
        "proj": rng.standard_normal((256, 768)).astype(np.float32),  # 196_608
        "bias": rng.standard_normal((1024,)).astype(np.float32),
    }
    assert 0.9e6 < sum(x.size for x in arrays.values()) < 1.2e6
    fp32 = payload_nbytes(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    record, _ = encode_arrays(arrays)
    int8 = payload_nbytes(record)
    assert fp32 / int8 >= 3.9


# ---------------------------------------------------------------------------
# Edge values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 5), (7,), ()])
def test_all_zero_tensor(shape):
    x = np.zeros(shape, dtype=np.float32)
    q = quantize(x)
    np.testing.assert_array_equal(q.values, np.zeros(shape, dtype=np.int8))
    np.testing.assert_array_equal(q.scale, np.ones_like(q.scale))
    np.testing.assert_array_equal(dequantize(q), x)


def test_zero_channel_gets_unit_scale():
    x = np.array([[0.0, 0.0], [1.0, -2.0]], dtype=np.float32)
    q = quantize(x, granularity="channel")
    assert q.scale[0] == 1.0
    np.testing.assert_allclose(q.scale[1], 2.0 / 127, rtol=1e-6)
    np.testing.assert_array_equal(q.values[0], [0, 0])


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("shape", [(3, 4), (5,), ()])
def test_constant_tensor_round_trips_exactly(shape, granularity):
    x = np.full(shape, 0.5, dtype=np.float32)
    out = dequantize(quantize(x, granularity=granularity))
    np.testing.assert_allclose(out, x, rtol=0, atol=np.finfo(np.float32).eps)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_with_name(bad):
    x = np.ones((3, 3), dtype=np.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"unet\.conv_in\.weight.*non-finite"):
        quantize(x, name="unet.conv_in.weight")
    with pytest.raises(ValueError, match="down.0.bias"):
        encode_arrays({"down.0.bias": x})


# ---------------------------------------------------------------------------
# Granularity
# ---------------------------------------------------------------------------


def test_scale_shapes_by_granularity():
    arrays = _random_arrays()
    expected_channel = {"conv": (16,), "linear": (32,), "bias": (1,), "scalar": (1,)}
    for name, x in arrays.items():
        assert quantize(x, granularity="channel").scale.shape == expected_channel[name]
        assert quantize(x, granularity="tensor").scale.shape == (1,)


def test_per_channel_protects_small_channels():
    rng = np.random.default_rng(3)
    x = np.stack(
        [
            1000.0 * rng.standard_normal(256),
            0.001 * rng.standard_normal(256),
        ]
    ).astype(np.float32)
    err_channel = np.abs(dequantize(quantize(x, granularity="channel")) - x)[1]
    err_tensor = np.abs(dequantize(quantize(x, granularity="tensor")) - x)[1]
    tiny = np.abs(x[1]).max()
    # Per-tensor scale (~1000*3/127) wipes out the tiny channel entirely ...
    np.testing.assert_array_equal(dequantize(quantize(x, granularity="tensor"))[1], 0)
    np.testing.assert_allclose(err_tensor.max(), tiny)
    # ... while its own scale keeps it within half a step of tiny/127.
    assert err_channel.max() <= tiny / 254 * (1 + 1e-5)
    assert err_channel.max() * 100 < err_tensor.max()


def test_decode_accepts_per_tensor_scale_for_matrix():
    x = _random_arrays()["linear"]
    record, _ = encode_arrays({"w": x}, granularity="tensor")
    out = decode_arrays(record, {"w": (x.shape, "float32")})
    expected = dequantize(quantize(x, granularity="tensor"))
    np.testing.assert_array_equal(out["w"], expected)


# ---------------------------------------------------------------------------
# Stochastic rounding
# ---------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    draws = 2000
    total = np.zeros(x.shape, dtype=np.float64)
    for _ in range(draws):
        total += dequantize(quantize(x, stochastic=True, rng=rng))
    mean = total / draws
    scale = quantize(x).scale[:, None].astype(np.float64)
    # Per-element std of the mean is <= scale / (2 * sqrt(draws)); allow ~5 sigma.
    assert np.all(np.abs(mean - x) <= 5 * scale / (2 * np.sqrt(draws)))
    # Nearest rounding is biased for most elements by much more than that.
    nearest_bias = np.abs(dequantize(quantize(x)) - x)
    assert np.mean(np.abs(mean - x)) < 0.25 * np.mean(nearest_bias)


def test_stochastic_rounding_is_deterministic_for_seed():
    x = _random_arrays()["conv"]
    a = quantize(x, stochastic=True, rng=np.random.default_rng(7))
    b = quantize(x, stochastic=True, rng=np.random.default_rng(7))
    c = quantize(x, stochastic=True, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.scale, b.scale)
    assert not np.array_equal(a.values, c.values)

    arrays = _random_arrays()
    rec1, _ = encode_arrays(arrays, stochastic=True, rng=np.random.default_rng(7))
    rec2, _ = encode_arrays(arrays, stochastic=True, rng=np.random.default_rng(7))
    for key, arr in rec1.items():
        assert arr.data == rec2[key].data


def test_stochastic_requires_rng():
    with pytest.raises(ValueError, match="rng"):
        quantize(np.ones(3, dtype=np.float32), stochastic=True)


def test_stochastic_stays_within_one_step():
    x = _random_arrays()["linear"]
    q = quantize(x, stochastic=True, rng=np.random.default_rng(0))
    err = np.abs(dequantize(q).astype(np.float64) - x)
    assert np.all(err <= _scale_bcast(q) * (1 + 1e-6))


# ---------------------------------------------------------------------------
# encode_arrays / residuals / is_quantized
# ---------------------------------------------------------------------------


def test_encode_record_layout():
    arrays = _random_arrays()
    record, _ = encode_arrays(arrays)
    assert set(record.keys()) == {NAMES_KEY, CODES_KEY, SCALES_KEY}
    assert bytes(record[NAMES_KEY].numpy()).decode().split("\n") == sorted(arrays)
    # every array's codes, flat, in sorted name order
    codes = record[CODES_KEY].numpy()
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(
        codes, np.concatenate([quantize(arrays[n]).values.reshape(-1) for n in sorted(arrays)])
    )
    # every scale in one float32 array, in sorted name order
    scales = record[SCALES_KEY].numpy()
    assert scales.dtype == np.float32
    expected = np.concatenate([quantize(arrays[n]).scale for n in sorted(arrays)])
    np.testing.assert_array_equal(scales, expected)
    assert scales.size == 16 + 32 + 1 + 1  # conv, linear per channel; bias, scalar per tensor


def test_decode_does_not_depend_on_dict_order():
    arrays = _random_arrays()
    record, _ = encode_arrays(dict(reversed(list(arrays.items()))))
    decoded = decode_arrays(record, _reference(arrays))
    for name, x in arrays.items():
        np.testing.assert_array_equal(decoded[name], dequantize(quantize(x)))


@pytest.mark.parametrize("stochastic", [False, True])
def test_residuals_complete_the_reconstruction(stochastic):
    arrays = _random_arrays()
    rng = np.random.default_rng(5) if stochastic else None
    record, residuals = encode_arrays(arrays, stochastic=stochastic, rng=rng)
    decoded = decode_arrays(record, _reference(arrays))
    assert set(residuals) == set(arrays)
    for name, x in arrays.items():
        assert residuals[name].shape == x.shape
        assert residuals[name].dtype == np.float32
        np.testing.assert_allclose(decoded[name] + residuals[name], x, atol=1e-6)
        if x.size > 1:
            assert np.abs(residuals[name]).max() > 0


def test_is_quantized():
    arrays = _random_arrays()
    record, _ = encode_arrays(arrays)
    assert is_quantized(record)
    assert not is_quantized(ArrayRecord({k: Array(v) for k, v in arrays.items()}))


def test_encode_rejects_names_it_cannot_carry():
    with pytest.raises(ValueError, match="newlines"):
        encode_arrays({"a\nb": np.ones(3, dtype=np.float32)})
    with pytest.raises(ValueError, match="no arrays"):
        encode_arrays({})
    with pytest.raises(ValueError, match="sorted, distinct"):
        names_array(["b", "a"])


# ---------------------------------------------------------------------------
# decode_arrays validation
# ---------------------------------------------------------------------------


@pytest.fixture
def payload():
    arrays = _random_arrays()
    record, _ = encode_arrays(arrays)
    return record, _reference(arrays)


def test_decode_rejects_missing_value(payload):
    record, ref = payload
    with pytest.raises(PayloadError, match="linear.*missing"):
        decode_arrays(_tamper(record, ref, linear=None, linear__scale=None), ref)


def test_decode_rejects_missing_scale(payload):
    record, ref = payload
    with pytest.raises(PayloadError, match="49 scales, expected 50 .channel. or 4 .tensor."):
        decode_arrays(_tamper(record, ref, scalar__scale=None), ref)
    with pytest.raises(PayloadError, match="not int8-encoded"):
        decode_arrays(_tamper(record, ref, **{SCALES_KEY: None}), ref)


def test_decode_rejects_extra_key(payload):
    record, ref = payload
    bad = ArrayRecord({**dict(record.items()), "intruder": Array(np.zeros(3, dtype=np.int8))})
    with pytest.raises(PayloadError, match="intruder"):
        decode_arrays(bad, ref)
    # an array the receiver does not expect, named with the others
    with pytest.raises(PayloadError, match="unexpected array.*scalar"):
        decode_arrays(record, {k: v for k, v in ref.items() if k != "scalar"})


def test_decode_rejects_names_out_of_order(payload):
    record, ref = payload
    names = np.frombuffer("\n".join(sorted(ref, reverse=True)).encode(), dtype=np.uint8)
    with pytest.raises(PayloadError, match="not sorted and distinct"):
        decode_arrays(_tamper(record, ref, **{NAMES_KEY: names}), ref)


def test_decode_rejects_wrong_shape(payload):
    record, ref = payload
    bad = _tamper(record, ref, linear=np.zeros((32, 63), dtype=np.int8))
    with pytest.raises(
        PayloadError, match=r"'@codes' is int8\[3201\], expected int8\[3233\] for these 4 arrays"
    ):
        decode_arrays(bad, ref)


def test_decode_rejects_float32_values(payload):
    record, ref = payload
    bad = _tamper(record, ref, **{CODES_KEY: record[CODES_KEY].numpy().astype(np.float32)})
    with pytest.raises(PayloadError, match=r"'@codes' is float32.*expected int8"):
        decode_arrays(bad, ref)


def test_decode_rejects_unquantized_record():
    arrays = _random_arrays()
    fp32 = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    with pytest.raises(PayloadError, match="not int8-encoded"):
        decode_arrays(fp32, _reference(arrays))


@pytest.mark.parametrize("value", [0.0, -0.5])
def test_decode_rejects_non_positive_scale(payload, value):
    record, ref = payload
    scale = np.full(16, 0.01, dtype=np.float32)
    scale[3] = value
    with pytest.raises(PayloadError, match=r"'conv'.*non-positive"):
        decode_arrays(_tamper(record, ref, conv__scale=scale), ref)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_decode_rejects_non_finite_scale(payload, value):
    record, ref = payload
    scale = np.array([value], dtype=np.float32)
    with pytest.raises(PayloadError, match=r"'bias'.*non-finite"):
        decode_arrays(_tamper(record, ref, bias__scale=scale), ref)


def test_decode_rejects_float64_scales(payload):
    record, ref = payload
    scales = record[SCALES_KEY].numpy().astype(np.float64)
    with pytest.raises(PayloadError, match=r"@scales.*float64.*float32"):
        decode_arrays(_tamper(record, ref, **{SCALES_KEY: scales}), ref)


@pytest.mark.parametrize(
    ("name", "scale_shape"),
    [("conv", (8,)), ("conv", (17,)), ("bias", (2,)), ("scalar", (2,))],
)
def test_decode_rejects_wrong_number_of_scales(payload, name, scale_shape):
    record, ref = payload
    scale = np.full(scale_shape, 0.01, dtype=np.float32)
    with pytest.raises(PayloadError, match=r"@scales.*holds \d+ scales, expected 50"):
        decode_arrays(_tamper(record, ref, **{f"{name}__scale": scale}), ref)


def test_decode_rejects_two_dimensional_scales(payload):
    record, ref = payload
    scales = record[SCALES_KEY].numpy().reshape(1, -1)
    with pytest.raises(PayloadError, match=r"1-D float32"):
        decode_arrays(_tamper(record, ref, **{SCALES_KEY: scales}), ref)


def test_decode_accepts_per_tensor_scales():
    arrays = _random_arrays()
    record, _ = encode_arrays(arrays, granularity="tensor")
    assert record[SCALES_KEY].numpy().size == len(arrays)
    decoded = decode_arrays(record, _reference(arrays))
    for name, x in arrays.items():
        np.testing.assert_array_equal(decoded[name], dequantize(quantize(x, granularity="tensor")))


# ---------------------------------------------------------------------------
# Caller misuse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, -1, 9, 16, 8.0, True])
def test_invalid_bits_raise(bits):
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        quantize(np.ones(4, dtype=np.float32), bits=bits)


@pytest.mark.parametrize("granularity", ["row", "", "Channel", None])
def test_invalid_granularity_raises(granularity):
    with pytest.raises(ValueError, match='"channel" \\| "tensor"'):
        quantize(np.ones((2, 2), dtype=np.float32), granularity=granularity)
    with pytest.raises(ValueError, match="granularity"):
        encode_arrays({"w": np.ones((2, 2))}, granularity=granularity)


def test_decode_rejects_scales_that_overflow_to_infinity(payload):
    record, ref = payload
    scales = record[SCALES_KEY].numpy().copy()
    scales[1:17] = 3e38  # conv's (after bias's one): finite and positive, but 127 * 3e38 is inf in float32
    with pytest.raises(PayloadError, match="'conv' is so large that its codes decode beyond float32"):
        decode_arrays(_tamper(record, ref, **{SCALES_KEY: scales}), ref)


# ---------------------------------------------------------------------------
# Packed codes: 4, 3, 2 and 1 bits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (16, 8, 3, 3)])
def test_packing_round_trips_every_code(bits, shape):
    rng = np.random.default_rng(bits)
    qmax = max(2 ** (bits - 1) - 1, 1)
    levels = np.array([-1, 1]) if bits == 1 else np.arange(-qmax, qmax + 1)
    values = rng.choice(levels, size=shape).astype(np.int8)
    packed = pack_codes(values, bits)
    assert packed.dtype == np.uint8 and packed.shape == (-(-values.size // PER_BYTE[bits]),)
    unpacked = unpack_codes(packed, bits, shape)
    assert unpacked.dtype == np.int8 and unpacked.shape == shape
    np.testing.assert_array_equal(unpacked, values)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_packed_record_layout_and_decode(bits):
    arrays = _random_arrays()
    record, residuals = encode_arrays(arrays, bits=bits)
    assert set(record.keys()) == {NAMES_KEY, CODES_KEY, SCALES_KEY, BITS_KEY}
    assert int(record[BITS_KEY].numpy()) == bits and record[BITS_KEY].dtype == "uint8"
    segments = _segments(record, _reference(arrays))  # each array's codes in whole bytes
    for name, x in arrays.items():
        assert segments[name].dtype == np.uint8
        np.testing.assert_array_equal(segments[name], pack_codes(quantize(x, bits=bits).values, bits))
    decoded = decode_arrays(record, _reference(arrays))
    for name, x in arrays.items():  # what the receiver gets is exactly what the sender's codes mean
        np.testing.assert_array_equal(decoded[name], dequantize(quantize(x, bits=bits)))
        np.testing.assert_allclose(decoded[name] + residuals[name], x, atol=1e-6)


def test_fewer_bits_send_fewer_bytes():
    x = {"w": np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)}
    fp32 = payload_nbytes(ArrayRecord({"w": Array(x["w"])}))
    sizes = {bits: payload_nbytes(encode_arrays(x, bits=bits)[0]) for bits in (8, 4, 2, 1)}
    # Below the ideal 4, 8, 16 and 32x by the framing of names, codes and scales (~400 bytes).
    assert (
        fp32 / sizes[8] > 3.9 and fp32 / sizes[4] > 7.6 and fp32 / sizes[2] > 14.5 and fp32 / sizes[1] > 26.5
    )
    # 3-bit codes use 4-bit slots: as many bytes as 4 bits.
    assert payload_nbytes(encode_arrays(x, bits=3)[0]) == sizes[4]


def test_one_bit_sends_signs_with_the_mean_magnitude():
    x = np.array([[0.5, -1.5, 0.0, 2.0], [-0.1, -0.3, 0.2, 0.0]], dtype=np.float32)
    q = quantize(x, bits=1)
    np.testing.assert_array_equal(q.values, [[1, -1, 1, 1], [-1, -1, 1, 1]])
    np.testing.assert_allclose(q.scale, [1.0, 0.15])
    np.testing.assert_allclose(dequantize(q), q.values * q.scale[:, None])


def test_one_bit_stochastic_signs_are_unbiased():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    draws = 4000
    mean = sum(dequantize(quantize(x, bits=1, stochastic=True, rng=rng)) for _ in range(draws)) / draws
    scale = np.abs(x).max(axis=1, keepdims=True)  # the largest magnitude: every |x| / scale <= 1
    assert np.all(np.abs(mean - x) <= 5 * scale / np.sqrt(draws))


@pytest.fixture
def packed_payload():
    arrays = _random_arrays()
    record, _ = encode_arrays(arrays, bits=3)
    return record, _reference(arrays)


def test_decode_rejects_a_truncated_packed_array(packed_payload):
    record, ref = packed_payload
    short = record[CODES_KEY].numpy()[:-1]
    with pytest.raises(
        PayloadError, match=r"'@codes' is uint8\[1616\], expected uint8\[1617\] .* 3-bit codes"
    ):
        decode_arrays(_tamper(record, ref, **{CODES_KEY: short}), ref)


def test_decode_rejects_codes_outside_the_bit_width(packed_payload):
    record, ref = packed_payload
    codes = _segments(record, ref)["bias"].copy()
    codes[0] = 0x07  # a 3-bit code is at most 6 (-3..3 offset by 3)
    with pytest.raises(PayloadError, match="'bias' holds a code above 6, outside 3-bit values"):
        decode_arrays(_tamper(record, ref, bias=codes), ref)


def test_decode_rejects_non_zero_padding():
    arrays = {"odd": np.linspace(-1, 1, 7, dtype=np.float32)}
    record, _ = encode_arrays(arrays, bits=2)
    codes = record[CODES_KEY].numpy().copy()
    codes[-1] |= 0b0100_0000  # the 8th 2-bit slot: padding
    with pytest.raises(PayloadError, match="'odd' has non-zero padding after its 7 codes"):
        decode_arrays(_tamper(record, _reference(arrays), odd=codes), _reference(arrays))


@pytest.mark.parametrize(
    "bits",
    [np.uint8(5), np.uint8(0), np.array([4], dtype=np.uint8), np.int64(4), np.float32(4)],
    ids=["five", "zero", "one-dimensional", "int64", "float32"],
)
def test_decode_rejects_a_bad_bit_width(packed_payload, bits):
    record, ref = packed_payload
    with pytest.raises(PayloadError, match=r"'@bits' is .*expected a uint8 scalar in 1..4"):
        decode_arrays(_tamper(record, ref, **{BITS_KEY: np.asarray(bits)}), ref)


def test_decode_rejects_a_bit_width_that_does_not_match_the_lengths(packed_payload):
    record, ref = packed_payload
    wrong_width = r"'@codes' is uint8\[1617\], expected uint8\[809\] for these 4 arrays of 2-bit codes"
    with pytest.raises(PayloadError, match=wrong_width):
        decode_arrays(_tamper(record, ref, **{BITS_KEY: np.asarray(2, dtype=np.uint8)}), ref)
    with pytest.raises(PayloadError, match=r"'@codes' is uint8\[1617\], expected int8\[3233\]"):
        decode_arrays(_tamper(record, ref, **{BITS_KEY: None}), ref)  # packed codes read as int8
