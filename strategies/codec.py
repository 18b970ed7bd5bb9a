"""Symmetric int8 quantization codec for model updates.

This is the single codec shared by clients (encode updates before sending),
the server (decode before averaging), tests and benchmarks.

Each float array ``name`` travels as two entries of an ``ArrayRecord``:

* ``name``: the quantized values, always stored as ``int8``;
* ``f"{name}{SCALE_SUFFIX}"``: the ``float32`` scale, one per output channel
  (axis 0) or a single per-tensor scale of shape ``(1,)``.

Dequantization is ``values * scale``. Only NumPy and ``flwr.app`` are used, so
the codec runs anywhere a ``ServerApp`` or ``ClientApp`` runs; it never
pickles or unpickles anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

SCALE_SUFFIX = "@scale"
"""Suffix of the key holding the scale that accompanies int8 array ``name``."""

MIN_BITS = 2
MAX_BITS = 8
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
        Bit width in ``[2, 8]``; values lie in ``[-qmax, qmax]`` with
        ``qmax = 2**(bits - 1) - 1`` and are always stored as ``int8``.
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

    scale = _compute_scale(x, qmax, granularity)
    if not np.isfinite(scale).all():
        raise ValueError(f"tensor {name!r} has magnitudes beyond the float32 range")
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


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """Reconstruct a ``float32`` array from a ``QuantizedTensor``."""
    values = np.asarray(q.values)
    scale = np.asarray(q.scale, dtype=np.float32)
    if scale.ndim != 1 or scale.size not in _allowed_scale_sizes(values.shape):
        raise ValueError(
            f"scale of shape {scale.shape} does not match values of shape "
            f"{values.shape}"
        )
    return values.astype(np.float32) * _broadcastable(scale, values.ndim)


# ---------------------------------------------------------------------------
# Named collections of tensors (what travels in a Message)
# ---------------------------------------------------------------------------


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
        Float arrays keyed by parameter name. Names must not end with
        ``SCALE_SUFFIX``.
    bits, granularity, stochastic, rng
        As in ``quantize``. A single ``rng`` is consumed in ``arrays`` order,
        so a fixed seed gives a reproducible encoding.

    Returns
    -------
    tuple[ArrayRecord, dict[str, np.ndarray]]
        The record, holding for each name the ``int8`` values under ``name``
        and the ``float32`` scale under ``name + SCALE_SUFFIX``; and the
        ``float32`` residuals ``x - dequantize(quantize(x))`` per name, which
        clients keep for error feedback.
    """
    entries: dict[str, Array] = {}
    residuals: dict[str, np.ndarray] = {}
    for name, x in arrays.items():
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(
                f"array name {name!r} must not end with {SCALE_SUFFIX!r} "
                "(reserved for scales)"
            )
        q = quantize(
            x,
            bits=bits,
            granularity=granularity,
            stochastic=stochastic,
            rng=rng,
            name=name,
        )
        entries[name] = Array(q.values)
        entries[f"{name}{SCALE_SUFFIX}"] = Array(q.scale)
        residuals[name] = np.asarray(x, dtype=np.float32) - dequantize(q)
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
        If an array is missing or unexpected, or a value or scale array has
        the wrong dtype or shape, or a scale is non-finite or not positive.
        The message names the array.
    """
    keys = set(record.keys())
    expected = {k for name in reference for k in (name, f"{name}{SCALE_SUFFIX}")}
    extra = sorted(keys - expected)
    if extra:
        raise PayloadError(f"unexpected array(s) in payload: {', '.join(extra)}")

    decoded: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in reference.items():
        shape = tuple(int(d) for d in shape)
        values = _load_values(record, name, shape)
        scale = _load_scale(record, name, shape)
        out = dequantize(QuantizedTensor(values=values, scale=scale))
        decoded[name] = out.astype(np.dtype(dtype), copy=False)
    return decoded


def is_quantized(record: ArrayRecord) -> bool:
    """Return ``True`` if the record carries quantized arrays (has scales)."""
    return any(key.endswith(SCALE_SUFFIX) for key in record.keys())


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
    """Largest quantized magnitude for ``bits``, validating the bit width."""
    if (
        isinstance(bits, bool)
        or not isinstance(bits, (int, np.integer))
        or not MIN_BITS <= bits <= MAX_BITS
    ):
        raise ValueError(
            f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}"
        )
    return 2 ** (int(bits) - 1) - 1


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity must be \"channel\" | \"tensor\", got {granularity!r}"
        )


def _as_real_array(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as an ndarray after checking it is real and finite."""
    x = np.asarray(x)
    if x.dtype == np.bool_ or not (
        np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    ):
        raise ValueError(f"tensor {name!r} has unsupported dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"tensor {name!r} holds non-finite values (NaN or inf)")
    return x


def _compute_scale(x: np.ndarray, qmax: int, granularity: str) -> np.ndarray:
    """Scale(s) ``max|x| / qmax`` per channel (axis 0) or per tensor."""
    absx = np.abs(x.astype(np.float64))
    if granularity == "channel" and x.ndim >= 2:
        # `initial=0` keeps empty channels well defined.
        amax = absx.max(axis=tuple(range(1, x.ndim)), initial=0.0)
    else:
        amax = np.array([absx.max(initial=0.0)])
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


def _load_values(record: ArrayRecord, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in record:
        raise PayloadError(f"array {name!r} is missing from the payload")
    values = _load(record, name)
    if values.dtype != np.int8:
        raise PayloadError(f"array {name!r} has dtype {values.dtype}, expected int8")
    if values.shape != shape:
        raise PayloadError(
            f"array {name!r} has shape {values.shape}, expected {shape}"
        )
    return values


def _load_scale(record: ArrayRecord, name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = f"{name}{SCALE_SUFFIX}"
    if key not in record:
        raise PayloadError(
            f"scale {key!r} for array {name!r} is missing from the payload"
        )
    scale = _load(record, key)
    if scale.dtype != np.float32:
        raise PayloadError(
            f"scale for array {name!r} has dtype {scale.dtype}, expected float32"
        )
    allowed = sorted(_allowed_scale_sizes(shape))
    if scale.ndim != 1 or scale.shape[0] not in allowed:
        expected = " or ".join(f"({n},)" for n in allowed)
        raise PayloadError(
            f"scale for array {name!r} has shape {scale.shape}, expected {expected}"
        )
    if not np.isfinite(scale).all():
        raise PayloadError(f"scale for array {name!r} holds non-finite values")
    if (scale <= 0).any():
        raise PayloadError(f"scale for array {name!r} holds non-positive values")
    return scale
