"""Symmetric linear quantization codec for model updates: 8 to 1 bits per value.

This is the single codec shared by clients (encode updates before sending),
the server (decode before averaging), tests and benchmarks.

A record of float arrays travels as an ``ArrayRecord`` with

* one entry per array ``name``: its quantized values. With 5 to 8 bits they
  are ``int8`` with the array's shape. With 4 or fewer they are packed into a
  flat ``uint8`` array, several codes per byte (offset by ``qmax`` so they are
  unsigned, lowest bits first): two 4-bit codes (``bits`` 3 and 4), four 2-bit
  codes, or eight signs (``bits=1``);
* one entry ``SCALES_KEY``: every ``float32`` scale, concatenated in sorted
  name order; an array has one scale per output channel (axis 0) or a single
  per-tensor scale. One scale array per message instead of one per tensor
  keeps Flower's per-array framing (about 450 bytes each) from eating the 4x;
* with packed codes, one entry ``BITS_KEY``: the bit width (a ``uint8``
  scalar), which the decoder checks against every array's length and codes.

``bits=1`` sends the sign of each value with a scale: the mean magnitude of
its channel (nearest), or the largest one with stochastic rounding, where
``+scale`` is drawn with probability ``(1 + x / scale) / 2`` (unbiased).

Dequantization is ``values * scale``. Only NumPy and ``flwr.app`` are used, so
the codec runs anywhere a ``ServerApp`` or ``ClientApp`` runs; it never
pickles or unpickles anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

SCALES_KEY = "@scales"
"""Key of the one ``float32`` array holding every scale of a record (names sorted)."""
BITS_KEY = "@bits"
"""Key of the bit width of a record whose codes are packed (4 bits or fewer)."""

CODEC_KEYS = (SCALES_KEY, BITS_KEY)
"""The entries of an encoded record that are not arrays of the model."""

MIN_BITS = 1
MAX_BITS = 8
# Bits each code takes in a packed byte (3-bit codes use 4-bit slots: bytes hold whole codes).
CONTAINER_BITS = {1: 1, 2: 2, 3: 4, 4: 4}
GRANULARITIES = ("channel", "tensor")


class PayloadError(ValueError):
    """A received payload does not match what the receiver expects.

    The message names the offending array and the reason.
    """


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized tensor: int8 values and the float32 scale(s) to restore them.

    Attributes
    ----------
    values : np.ndarray
        ``int8`` array with the same shape as the original tensor.
    scale : np.ndarray
        ``float32`` array of shape ``(C,)`` (one scale per output channel,
        axis 0) or ``(1,)`` (one scale for the whole tensor).
    """

    values: np.ndarray
    scale: np.ndarray


# ---------------------------------------------------------------------------
# Single tensors
# ---------------------------------------------------------------------------


def quantize(
    x: np.ndarray,
    *,
    bits: int = 8,
    granularity: str = "channel",
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
    name: str = "tensor",
) -> QuantizedTensor:
    """Quantize a real-valued array with symmetric linear quantization.

    Parameters
    ----------
    x : np.ndarray
        Array to quantize. Must hold only finite real values.
    bits : int (default: 8)
        Bit width in ``[1, 8]``; values lie in ``[-qmax, qmax]`` with
        ``qmax = 2**(bits - 1) - 1`` (``bits=1``: signs, -1 or +1, see the
        module docstring) and are returned as ``int8``.
    granularity : str (default: "channel")
        ``"channel"``: one scale per output channel (axis 0) for arrays with
        ``ndim >= 2``; 0-D and 1-D arrays get a per-tensor scale.
        ``"tensor"``: one scale for the whole array.
    stochastic : bool (default: False)
        If ``True``, use unbiased stochastic rounding ``floor(x/scale + u)``,
        ``u ~ U[0, 1)``, drawn from ``rng``. Otherwise round to nearest.
    rng : np.random.Generator | None (default: None)
        Random generator; required when ``stochastic`` is ``True``.
    name : str (default: "tensor")
        Name used in error messages.

    Returns
    -------
    QuantizedTensor
        The ``int8`` values and ``float32`` scale(s). With nearest rounding the
        round-trip error per element is at most ``scale / 2``.
    """
    qmax = _qmax(bits)
    _check_granularity(granularity)
    if stochastic and rng is None:
        raise ValueError("stochastic rounding requires an `rng` (np.random.Generator)")
    x = _as_real_array(x, name)

    scale = _compute_scale(x, qmax, granularity, mean=bits == 1 and not stochastic)
    if not np.isfinite(scale).all():
        raise ValueError(f"tensor {name!r} has magnitudes beyond the float32 range")
    if bits == 1:
        return QuantizedTensor(values=_signs(x, scale, stochastic, rng), scale=scale)
    # Divide in float64 by the float32 scale actually sent, so that the error
    # bound holds for what the receiver reconstructs.
    scaled = x.astype(np.float64) / _broadcastable(scale, x.ndim)
    if stochastic:
        assert rng is not None
        scaled = np.floor(scaled + rng.random(scaled.shape))
    else:
        scaled = np.rint(scaled)
    # asarray: ufuncs on 0-D arrays return NumPy scalars, which Array rejects.
    values = np.asarray(np.clip(scaled, -qmax, qmax), dtype=np.int8)
    return QuantizedTensor(values=values, scale=scale)


def _signs(x: np.ndarray, scale: np.ndarray, stochastic: bool, rng: np.random.Generator | None) -> np.ndarray:
    """1-bit codes: the sign of ``x`` (0 counts as +), or +1 drawn with probability (1 + x/scale) / 2."""
    if not stochastic:
        return np.asarray(np.where(x >= 0, 1, -1), dtype=np.int8)
    assert rng is not None
    plus = np.clip((1 + x.astype(np.float64) / _broadcastable(scale, x.ndim)) / 2, 0, 1)
    return np.asarray(np.where(rng.random(x.shape) < plus, 1, -1), dtype=np.int8)


def pack_codes(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack int8 codes of ``bits`` (1..4) into a flat uint8 array, ``8 // CONTAINER_BITS`` per byte.

    Codes are offset by ``qmax`` (signs: -1 -> 0, +1 -> 1) and fill each byte from its
    lowest bits; the last byte is padded with zeros.
    """
    width = CONTAINER_BITS[bits]
    per_byte = 8 // width
    flat = np.asarray(values, dtype=np.int16).reshape(-1)
    unsigned = (flat + 1) // 2 if bits == 1 else flat + _qmax(bits)
    padded = np.zeros(-(-flat.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: flat.size] = unsigned
    shifts = np.arange(per_byte, dtype=np.uint8) * width
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, shape: tuple[int, ...], name: str = "tensor") -> np.ndarray:
    """The int8 codes of ``shape`` from :func:`pack_codes`' bytes; ``PayloadError`` if they do not fit.

    The byte count must be exactly what ``shape`` needs, every code within
    ``[0, 2 qmax]`` (e.g. a 3-bit code in its 4-bit slot at most 6) and the padding zero.
    """
    width = CONTAINER_BITS[bits]
    per_byte, count = 8 // width, int(np.prod(shape, dtype=np.int64))
    expected = -(-count // per_byte)
    if packed.dtype != np.uint8 or packed.shape != (expected,):
        raise PayloadError(
            f"array {name!r} is {packed.dtype}{list(packed.shape)}, expected uint8[{expected}] "
            f"({count} {bits}-bit codes, {per_byte} per byte)"
        )
    shifts = np.arange(per_byte, dtype=np.uint8) * width
    codes = ((packed[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)
    if codes[count:].any():
        raise PayloadError(f"array {name!r} has non-zero padding after its {count} codes")
    codes = codes[:count].astype(np.int8)
    if bits == 1:
        return (2 * codes - 1).reshape(shape)
    qmax = _qmax(bits)
    if codes.max(initial=0) > 2 * qmax:
        raise PayloadError(f"array {name!r} holds a code above {2 * qmax}, outside {bits}-bit values")
    return (codes - qmax).reshape(shape)


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """Reconstruct a ``float32`` array from a ``QuantizedTensor``."""
    values = np.asarray(q.values)
    scale = np.asarray(q.scale, dtype=np.float32)
    if scale.ndim != 1 or scale.size not in _allowed_scale_sizes(values.shape):
        raise ValueError(f"scale of shape {scale.shape} does not match values of shape {values.shape}")
    return values.astype(np.float32) * _broadcastable(scale, values.ndim)


# ---------------------------------------------------------------------------
# Named collections of tensors (what travels in a Message)
# ---------------------------------------------------------------------------


def scale_lengths(reference: dict[str, tuple[tuple[int, ...], str]], granularity: str) -> dict[str, int]:
    """How many scales each array has in the packed scale array, in packing order.

    Packing order is sorted by name, so sender and receiver agree whatever order
    their dicts have. Per tensor: one scale each; per channel: ``shape[0]`` for
    arrays with ``ndim >= 2`` and one for the others.
    """
    _check_granularity(granularity)
    lengths = {}
    for name in sorted(reference):
        shape = tuple(reference[name][0])
        if 0 in shape:  # would make the packed layout ambiguous; no model has one
            raise PayloadError(f"array {name!r} is empty {list(shape)}: empty arrays are not encoded")
        per_channel = granularity == "channel" and len(shape) >= 2
        lengths[name] = int(shape[0]) if per_channel else 1
    return lengths


def encode_arrays(
    arrays: dict[str, np.ndarray],
    *,
    bits: int = 8,
    granularity: str = "channel",
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """Quantize named arrays into an ``ArrayRecord`` ready to send.

    Parameters
    ----------
    arrays : dict[str, np.ndarray]
        Float arrays keyed by parameter name. ``SCALES_KEY`` and ``BITS_KEY`` are reserved.
    bits, granularity, stochastic, rng
        As in ``quantize``. A single ``rng`` is consumed in ``arrays`` order,
        so a fixed seed gives a reproducible encoding.

    Returns
    -------
    tuple[ArrayRecord, dict[str, np.ndarray]]
        The record, holding for each name its codes under ``name`` (``int8``,
        or packed ``uint8`` for 4 bits or fewer, with ``BITS_KEY``), and
        every ``float32`` scale in one array under ``SCALES_KEY`` (names
        sorted, see ``scale_lengths``): one array instead of one per tensor
        halves Flower's per-array framing. And the ``float32`` residuals
        ``x - dequantize(quantize(x))`` per name, which clients keep for error
        feedback.
    """
    for reserved in CODEC_KEYS:
        if reserved in arrays:
            raise ValueError(f"array name {reserved!r} is reserved for the codec")
    _qmax(bits)  # checks the bit width before anything is encoded
    packed_codes = bits in CONTAINER_BITS
    entries: dict[str, Array] = {}
    scales: dict[str, np.ndarray] = {}
    residuals: dict[str, np.ndarray] = {}
    for name, x in arrays.items():
        q = quantize(
            x,
            bits=bits,
            granularity=granularity,
            stochastic=stochastic,
            rng=rng,
            name=name,
        )
        entries[name] = Array(pack_codes(q.values, bits) if packed_codes else q.values)
        scales[name] = q.scale
        residuals[name] = np.asarray(x, dtype=np.float32) - dequantize(q)
    packed = [scales[name] for name in sorted(scales)]
    entries[SCALES_KEY] = Array(np.concatenate(packed) if packed else np.zeros(0, dtype=np.float32))
    if packed_codes:
        entries[BITS_KEY] = Array(np.asarray(bits, dtype=np.uint8))
    return ArrayRecord(entries), residuals


def decode_arrays(
    record: ArrayRecord,
    reference: dict[str, tuple[tuple[int, ...], str]],
) -> dict[str, np.ndarray]:
    """Validate and dequantize a received quantized ``ArrayRecord``.

    Parameters
    ----------
    record : ArrayRecord
        Payload produced by ``encode_arrays`` (possibly by another party).
    reference : dict[str, tuple[tuple[int, ...], str]]
        Expected arrays: ``name -> (shape, dtype)`` of the float model
        parameter, e.g. ``{"fc.weight": ((10, 64), "float32")}``.

    Returns
    -------
    dict[str, np.ndarray]
        Dequantized arrays, in ``reference`` order, with the reference shape
        and cast to the reference dtype.

    Raises
    ------
    PayloadError
        If an array is missing or unexpected, a value array has the wrong
        dtype or shape (packed: the wrong length for its bit width, a code out
        of range), the bit width is not 1..4, or the packed scales have the wrong dtype or length
        (neither per-channel nor per-tensor for these arrays) or hold a
        non-finite or non-positive scale. The message names the array.
    """
    keys = set(record.keys())
    missing = [name for name in reference if name not in keys]
    if missing:
        raise PayloadError(f"array {missing[0]!r} is missing from the payload ({len(missing)} missing)")
    extra = sorted(keys - set(reference) - set(CODEC_KEYS))
    if extra:
        raise PayloadError(f"unexpected array(s) in payload: {', '.join(extra)}")
    scales = _load_scales(record, reference)
    bits = _load_bits(record)

    decoded: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in reference.items():
        shape = tuple(int(d) for d in shape)
        values = _load_values(record, name, shape, bits)
        out = dequantize(QuantizedTensor(values=values, scale=scales[name])).astype(
            np.dtype(dtype), copy=False
        )
        if not np.isfinite(out).all():  # finite codes and scales can still overflow
            raise PayloadError(f"array {name!r} decodes to non-finite values")
        decoded[name] = out
    return decoded


def is_quantized(record: ArrayRecord) -> bool:
    """Return ``True`` if the record carries quantized arrays (has packed scales)."""
    return SCALES_KEY in record


def payload_nbytes(record: ArrayRecord) -> int:
    """Return the bytes of array data placed on the wire for ``record``.

    This is the exact sum of the serialized (npy, header included) sizes of
    its arrays; unlike ``ArrayRecord.count_bytes`` it excludes key strings.
    """
    return sum(len(array.data) for _, array in record.items())


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _qmax(bits: int) -> int:
    """Largest quantized magnitude for ``bits`` (1 for signs), validating the bit width."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return max(2 ** (int(bits) - 1) - 1, 1)


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f'granularity must be "channel" | "tensor", got {granularity!r}')


def _as_real_array(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as an ndarray after checking it is real and finite."""
    x = np.asarray(x)
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"tensor {name!r} has unsupported dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"tensor {name!r} holds non-finite values (NaN or inf)")
    return x


def _compute_scale(x: np.ndarray, qmax: int, granularity: str, *, mean: bool = False) -> np.ndarray:
    """Scale(s) ``max|x| / qmax`` (``mean``: the mean of ``|x|``) per channel (axis 0) or per tensor."""
    absx = np.abs(x.astype(np.float64))
    if granularity == "channel" and x.ndim >= 2:
        axes = tuple(range(1, x.ndim))
        # `initial=0` keeps empty channels well defined.
        amax = absx.mean(axis=axes) if mean else absx.max(axis=axes, initial=0.0)
    else:
        amax = np.array([absx.mean() if mean else absx.max(initial=0.0)])
    scale = (amax / qmax).astype(np.float32)
    # All-zero channels (or scales underflowing float32) get 1.0 so every
    # scale is finite and positive; their values quantize to 0 anyway.
    scale[scale <= 0] = 1.0
    return scale


def _broadcastable(scale: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) or (1,) scale to broadcast against an ndim-D array."""
    if ndim == 0:
        return scale.reshape(())
    return scale.reshape((-1,) + (1,) * (ndim - 1))


def _allowed_scale_sizes(shape: tuple[int, ...]) -> set[int]:
    """Scale lengths valid for an array of ``shape``: 1, or C for ndim >= 2."""
    return {1, shape[0]} if len(shape) >= 2 else {1}


def _load(record: ArrayRecord, key: str) -> np.ndarray:
    """Deserialize one entry, reporting failures as ``PayloadError``."""
    try:
        # Array.numpy() loads with allow_pickle=False.
        return record[key].numpy()
    except (TypeError, ValueError, OSError, EOFError) as err:
        raise PayloadError(f"array {key!r} could not be deserialized: {err}") from err


def _load_bits(record: ArrayRecord) -> int:
    """The record's bit width: ``BITS_KEY`` (packed codes, 1..4), or 8 without it (int8 codes)."""
    if BITS_KEY not in record:
        return MAX_BITS
    bits = _load(record, BITS_KEY)
    if bits.dtype != np.uint8 or bits.shape != () or int(bits) not in CONTAINER_BITS:
        raise PayloadError(
            f"{BITS_KEY!r} is {bits.dtype}{list(bits.shape)} = {bits.tolist()}, expected a uint8 scalar in 1..4"
        )
    return int(bits)


def _load_values(record: ArrayRecord, name: str, shape: tuple[int, ...], bits: int = MAX_BITS) -> np.ndarray:
    if name not in record:
        raise PayloadError(f"array {name!r} is missing from the payload")
    values = _load(record, name)
    if bits in CONTAINER_BITS:
        return unpack_codes(values, bits, shape, name)
    if values.dtype != np.int8:
        raise PayloadError(f"array {name!r} has dtype {values.dtype}, expected int8")
    if values.shape != shape:
        raise PayloadError(f"array {name!r} has shape {values.shape}, expected {shape}")
    return values


def _load_scales(
    record: ArrayRecord, reference: dict[str, tuple[tuple[int, ...], str]]
) -> dict[str, np.ndarray]:
    """Split the packed scales into one ``(C,)`` or ``(1,)`` array per name."""
    if SCALES_KEY not in record:
        raise PayloadError(f"the payload has no {SCALES_KEY!r} array: it is not int8-encoded")
    packed = _load(record, SCALES_KEY)
    if packed.dtype != np.float32 or packed.ndim != 1:
        raise PayloadError(
            f"{SCALES_KEY!r} is {packed.dtype}{list(packed.shape)}, expected a 1-D float32 array"
        )
    layouts = {g: scale_lengths(reference, g) for g in GRANULARITIES}
    lengths = next((lay for lay in layouts.values() if sum(lay.values()) == packed.size), None)
    if lengths is None:
        expected = " or ".join(f"{sum(lay.values())} ({g})" for g, lay in layouts.items())
        raise PayloadError(f"{SCALES_KEY!r} holds {packed.size} scales, expected {expected} for these arrays")
    scales, offset = {}, 0
    for name, length in lengths.items():
        scale = packed[offset : offset + length]
        offset += length
        if not np.isfinite(scale).all():
            raise PayloadError(f"scale for array {name!r} holds non-finite values")
        if (scale <= 0).any():
            raise PayloadError(f"scale for array {name!r} holds non-positive values")
        scales[name] = scale
    return scales
