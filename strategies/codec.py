"""Symmetric linear quantization codec for model updates: 8 to 1 bits per value.

This is the single codec shared by clients (encode updates before sending),
the server (decode before averaging), tests and benchmarks.

A record of float arrays travels as an ``ArrayRecord`` of four entries at
most, whatever the number of arrays (Flower frames every array it carries:
its npy header alone is 128 bytes, which on a small UNet's hundred-odd
tensors would eat 4 % of a 4-bit message):

* ``NAMES_KEY``: the arrays' names, sorted, joined by ``\\n``, as UTF-8
  ``uint8`` (a partial-exchange reply names the parts it sends);
* ``CODES_KEY``: every array's codes, flat, concatenated in name order. With
  5 to 8 bits they are ``int8``. With 4 or fewer each array's codes are packed
  into whole bytes, several per byte (offset by ``qmax`` so they are unsigned,
  lowest bits first, the array's last byte padded with zeros): two 4-bit codes
  (``bits`` 3 and 4), four 2-bit codes, or eight signs (``bits=1``);
* ``SCALES_KEY``: every ``float32`` scale, concatenated in name order; an
  array has one scale per output channel (axis 0) or a single per-tensor scale;
* with packed codes, ``BITS_KEY``: the bit width (a ``uint8`` scalar), which
  the decoder checks against the codes' length and values.

The receiver knows every array's shape, so it splits the codes and scales
itself and checks that their lengths match exactly.

``bits=1`` sends the sign of each value with a scale: the mean magnitude of
its channel (nearest), or the largest one with stochastic rounding, where
``+scale`` is drawn with probability ``(1 + x / scale) / 2`` (unbiased).

Dequantization is ``values * scale``. The arithmetic runs in torch, on the
device where the arrays are (a client's CUDA weights are encoded on the GPU;
only the codes travel to the host), one vectorised pass per step and tensor;
NumPy arrays are used in place (``torch.from_numpy``, no copy). What travels
is NumPy's npy format inside Flower's ``Array``: nothing is pickled or
unpickled.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NAMES_KEY = "@names"
"""Key of the sorted names of the encoded arrays (UTF-8 bytes, joined by newlines)."""
CODES_KEY = "@codes"
"""Key of every array's codes, concatenated in name order (``int8``, or packed ``uint8``)."""
SCALES_KEY = "@scales"
"""Key of the one ``float32`` array holding every scale of a record (names sorted)."""
BITS_KEY = "@bits"
"""Key of the bit width of a record whose codes are packed (4 bits or fewer)."""

CODEC_KEYS = (NAMES_KEY, CODES_KEY, SCALES_KEY, BITS_KEY)
"""The entries of an encoded record that are not arrays of the model."""

MIN_BITS = 1
MAX_BITS = 8
# Bits each code takes in a packed byte (3-bit codes use 4-bit slots: bytes hold whole codes).
CONTAINER_BITS = {1: 1, 2: 2, 3: 4, 4: 4}
GRANULARITIES = ("channel", "tensor")
_LARGEST_CODE = 128  # |int8| at most


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


Tensor = np.ndarray | torch.Tensor
"""What the codec encodes: a NumPy array or a torch tensor (on any device)."""


def quantize(
    x: Tensor,
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
    x : np.ndarray | torch.Tensor
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
        ``u ~ U[0, 1)``, drawn from a torch generator seeded by ``rng``.
        Otherwise round to nearest.
    rng : np.random.Generator | None (default: None)
        Random generator; required when ``stochastic`` is ``True``.
    name : str (default: "tensor")
        Name used in error messages.

    Returns
    -------
    QuantizedTensor
        The ``int8`` values and ``float32`` scale(s), as NumPy arrays. With
        nearest rounding the round-trip error per element is at most ``scale / 2`` (plus
        float32 rounding, ``2**-24 |x|``).
    """
    _qmax(bits)
    _check_granularity(granularity)
    x = _as_real_tensor(x, name)
    codes, scale, _ = _quantize(x, bits, granularity, _generator(stochastic, rng, x.device), name)
    return QuantizedTensor(values=codes.cpu().numpy(), scale=scale.cpu().numpy())


def _quantize(
    x: torch.Tensor,
    bits: int,
    granularity: str,
    generator: torch.Generator | None,
    name: str,
    *,
    offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codes of ``x``, its ``float32`` scales and the residual ``x - codes * scale``.

    ``generator``: stochastic rounding (None: to nearest). Codes and residual have
    ``x``'s shape; codes are ``int8``, or with ``offset`` the ``uint8`` values that
    ``_pack`` packs (code + qmax; signs: 0 for -1, 1 for +1).
    """
    qmax = _qmax(bits)
    rows = _rows(x, granularity)
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.to(torch.float32)
    scale = _compute_scale(rows, qmax, mean=bits == 1 and generator is None)
    # NaN or inf in x make its scale non-finite: no separate pass over x checks them.
    if not torch.isfinite(scale).all():
        raise ValueError(f"tensor {name!r} holds non-finite values (NaN or inf) or magnitudes beyond float32")
    codes = torch.empty(rows.shape, dtype=torch.uint8 if offset else torch.int8, device=rows.device)
    residual = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    for block in _blocks(rows):
        _quantize_block(rows[block], scale[block[0], None], bits, generator, codes[block], residual[block])
    return codes.reshape(x.shape), scale, residual.reshape(x.shape)


def _quantize_block(
    rows: torch.Tensor,
    column: torch.Tensor,
    bits: int,
    generator: torch.Generator | None,
    codes: torch.Tensor,
    residual: torch.Tensor,
) -> None:
    """Write the codes of ``rows`` (scales ``column``) into ``codes`` and ``x - codes * scale`` into ``residual``."""
    qmax = _qmax(bits)
    if bits == 1:
        plus = _plus(rows, column, generator)
        sign = plus.to(rows.dtype).mul_(2).sub_(1)
        torch.addcmul(rows, sign, column, value=-1, out=residual)
        codes.copy_(plus if codes.dtype == torch.uint8 else sign)
        return
    # Divided in x's precision by the float32 scale actually sent: the receiver's
    # error is at most scale / 2 plus float32 rounding (2**-24 |x|).
    scaled = rows / column
    if generator is not None:
        noise = torch.rand(scaled.shape, generator=generator, dtype=scaled.dtype, device=scaled.device)
        scaled.add_(noise).floor_().clamp_(-qmax, qmax)  # x / scale + u may round up to qmax + 1
    else:
        # |x| / scale <= qmax up to float32 rounding, which rounds back to qmax: no clamp needed.
        scaled.round_()  # half to even, as NumPy's rint
    torch.addcmul(rows, scaled, column, value=-1, out=residual)
    codes.copy_(scaled.add_(qmax) if codes.dtype == torch.uint8 else scaled)


# Elements per block of the quantizer on CPU: a block's temporaries stay in the core's cache,
# so x is read from memory once more after its scales and the codes and residual written once.
_BLOCK = 1 << 16


def _blocks(rows: torch.Tensor) -> Iterator[tuple[slice, slice]]:
    """Blocks of whole rows (or of one long row) of ``rows``, about ``_BLOCK`` elements each; one on a GPU."""
    count, length = rows.shape
    if rows.device.type != "cpu" or rows.numel() <= _BLOCK:
        yield slice(0, count), slice(0, length)
    elif length >= _BLOCK:
        for row in range(count):
            for start in range(0, length, _BLOCK):
                yield slice(row, row + 1), slice(start, start + _BLOCK)
    else:
        step = _BLOCK // length
        for start in range(0, count, step):
            yield slice(start, start + step), slice(0, length)


def _plus(rows: torch.Tensor, column: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """1-bit codes as booleans: the sign of each value (0 counts as +), or + with probability (1 + x/scale) / 2."""
    if generator is None:
        return rows >= 0
    probability = ((1 + rows / column) / 2).clamp_(0, 1)
    return torch.rand(rows.shape, generator=generator, dtype=rows.dtype, device=rows.device) < probability


def pack_codes(values: Tensor, bits: int) -> np.ndarray:
    """Pack int8 codes of ``bits`` (1..4) into a flat uint8 array, ``8 // CONTAINER_BITS`` per byte.

    Codes are offset by ``qmax`` (signs: -1 -> 0, +1 -> 1) and fill each byte from its
    lowest bits; the last byte is padded with zeros.
    """
    codes = torch.as_tensor(values).reshape(-1)
    unsigned = codes.gt(0) if bits == 1 else codes.add(_qmax(bits))
    return _pack(unsigned.to(torch.uint8), bits).cpu().numpy()


def _pack(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Offset ``uint8`` codes (flat) packed ``8 // CONTAINER_BITS[bits]`` per byte, on their device."""
    if bits == 1 and unsigned.device.type == "cpu":
        # NumPy's packbits is the same layout (lowest bit first, zero padding) and ten times faster.
        return torch.from_numpy(np.packbits(unsigned.numpy(), bitorder="little"))
    width = CONTAINER_BITS[bits]
    per_byte = 8 // width
    count = unsigned.numel()
    if count % per_byte:  # pad the last byte with zeros
        padded = torch.zeros(-(-count // per_byte) * per_byte, dtype=torch.uint8, device=unsigned.device)
        unsigned = padded.index_copy_(0, torch.arange(count, device=unsigned.device), unsigned)
    slots = unsigned.view(-1, per_byte)
    packed = slots[:, 0].clone()
    for slot in range(1, per_byte):
        packed.bitwise_or_(slots[:, slot] << (slot * width))
    return packed


def unpack_codes(packed: np.ndarray, bits: int, shape: tuple[int, ...], name: str = "tensor") -> np.ndarray:
    """The int8 codes of ``shape`` from :func:`pack_codes`' bytes; ``PayloadError`` if they do not fit.

    The byte count must be exactly what ``shape`` needs, every code within
    ``[0, 2 qmax]`` (e.g. a 3-bit code in its 4-bit slot at most 6) and the padding zero.
    """
    return _unpack(packed, bits, shape, name).numpy()


def _unpack(packed: np.ndarray, bits: int, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """``unpack_codes`` as a CPU tensor."""
    width = CONTAINER_BITS[bits]
    per_byte, count = 8 // width, int(np.prod(shape, dtype=np.int64))
    expected = _code_bytes(shape, bits)
    if packed.dtype != np.uint8 or packed.shape != (expected,):
        raise PayloadError(
            f"array {name!r} is {packed.dtype}{list(packed.shape)}, expected uint8[{expected}] "
            f"({count} {bits}-bit codes, {per_byte} per byte)"
        )
    if bits == 1:
        unsigned = torch.from_numpy(np.unpackbits(packed, bitorder="little"))
    else:
        source = torch.from_numpy(packed)
        slots = torch.empty((expected, per_byte), dtype=torch.uint8)
        for slot in range(per_byte):
            torch.bitwise_and(source >> (slot * width), (1 << width) - 1, out=slots[:, slot])
        unsigned = slots.view(-1)
    if unsigned[count:].any():
        raise PayloadError(f"array {name!r} has non-zero padding after its {count} codes")
    # Offset codes are at most 14, so int8 arithmetic on them is exact (and a quarter of float32's bytes).
    codes = unsigned[:count].view(torch.int8)
    if bits == 1:
        return codes.mul_(2).sub_(1).reshape(shape)
    qmax = _qmax(bits)
    if count and int(unsigned[:count].max()) > 2 * qmax:
        raise PayloadError(f"array {name!r} holds a code above {2 * qmax}, outside {bits}-bit values")
    return codes.sub_(qmax).reshape(shape)


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """Reconstruct a ``float32`` array from a ``QuantizedTensor``."""
    values = torch.as_tensor(np.asarray(q.values))
    scale = np.asarray(q.scale, dtype=np.float32)
    if scale.ndim != 1 or scale.size not in _allowed_scale_sizes(tuple(values.shape)):
        raise ValueError(f"scale of shape {scale.shape} does not match values of shape {tuple(values.shape)}")
    return _dequantize(values, torch.from_numpy(scale)).numpy()


def _dequantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values * scale`` in float32, the scale broadcast per channel (axis 0) or per tensor."""
    scale = scale.to(values.device)
    # One pass: torch casts the int8 codes to float32 inside the multiplication.
    return torch.mul(values, scale.reshape((-1,) + (1,) * (values.ndim - 1)) if values.ndim else scale[0])


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
    arrays: dict[str, Tensor],
    *,
    bits: int = 8,
    granularity: str = "channel",
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[ArrayRecord, dict[str, Tensor]]:
    """Quantize named arrays into an ``ArrayRecord`` ready to send.

    Parameters
    ----------
    arrays : dict[str, np.ndarray | torch.Tensor]
        Float arrays keyed by parameter name, NumPy or torch on any device
        (encoded there). Names must not contain a newline.
    bits, granularity, stochastic, rng
        As in ``quantize``. One torch generator, seeded from ``rng``, draws
        every tensor's noise in ``arrays`` order, so a fixed seed gives a
        reproducible encoding.

    Returns
    -------
    tuple[ArrayRecord, dict[str, np.ndarray | torch.Tensor]]
        The record (``NAMES_KEY``, ``CODES_KEY``, ``SCALES_KEY`` and, for 4
        bits or fewer, ``BITS_KEY``; see the module docstring), and the
        ``float32`` residuals ``x - dequantize(quantize(x))`` per name, which
        clients keep for error feedback: NumPy arrays for NumPy input, tensors
        on the input's device otherwise.
    """
    if not arrays:
        raise ValueError("there are no arrays to encode")
    _qmax(bits)  # checks the bit width before anything is encoded
    _check_granularity(granularity)
    names = sorted(arrays)
    packed_codes = bits in CONTAINER_BITS
    codes: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    residuals: dict[str, Tensor] = {}
    generators: dict[torch.device, torch.Generator | None] = {}
    for name, array in arrays.items():
        x = _as_real_tensor(array, name)
        if x.device not in generators:
            generators[x.device] = _generator(stochastic, rng, x.device)
        flat, scale, residual = _quantize(
            x, bits, granularity, generators[x.device], name, offset=packed_codes
        )
        codes[name] = (_pack(flat.reshape(-1), bits) if packed_codes else flat.reshape(-1)).cpu()
        scales[name] = scale.cpu()
        residuals[name] = residual.numpy() if isinstance(array, np.ndarray) else residual
    entries = {
        NAMES_KEY: names_array(names),
        CODES_KEY: Array(torch.cat([codes[name] for name in names]).numpy()),
        SCALES_KEY: Array(torch.cat([scales[name] for name in names]).numpy()),
    }
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
        If the record's entries are not the codec's, an array is missing or
        unexpected, the codes have the wrong dtype or length for these arrays
        and this bit width (packed: a code out of range, non-zero padding), the
        bit width is not 1..4, or the scales have the wrong dtype or length
        (neither per-channel nor per-tensor for these arrays) or hold a
        non-finite or non-positive scale, or one so large that its codes
        would decode beyond float32. The message names the array.
    """
    if not is_quantized(record):
        raise PayloadError(f"the payload has no {SCALES_KEY!r} array: it is not int8-encoded")
    extra = sorted(set(record.keys()) - set(CODEC_KEYS))
    if extra:
        raise PayloadError(f"unexpected array(s) in payload: {', '.join(extra[:5])}")
    names = load_names(record, NAMES_KEY)
    missing = [name for name in reference if name not in names]
    if missing:
        raise PayloadError(f"array {missing[0]!r} is missing from the payload ({len(missing)} missing)")
    unexpected = sorted(set(names) - set(reference))
    if unexpected:
        raise PayloadError(f"unexpected array(s) in payload: {', '.join(unexpected[:5])}")
    scales = _load_scales(record, reference)
    bits = _load_bits(record)
    shapes = {name: tuple(int(d) for d in reference[name][0]) for name in names}
    codes = _load_codes(record, shapes, bits)
    decoded: dict[str, np.ndarray] = {}
    for name, (_, dtype) in reference.items():
        out = _dequantize(codes[name], torch.from_numpy(scales[name])).numpy()
        decoded[name] = out.astype(np.dtype(dtype), copy=False)
    return decoded


def names_array(names: list[str]) -> Array:
    """Sorted, distinct ``names`` as one ``uint8`` array of UTF-8 text joined by newlines."""
    if any(b <= a for a, b in zip(names, names[1:])) or any("\n" in name for name in names):
        raise ValueError("array names must be sorted, distinct and free of newlines")
    return Array(np.frombuffer("\n".join(names).encode(), dtype=np.uint8).copy())


def load_names(record: ArrayRecord, key: str) -> list[str]:
    """The names written by :func:`names_array` under ``key``, checked to be sorted and distinct."""
    if key not in record:
        raise PayloadError(f"the payload has no {key!r} array naming its tensors")
    raw = load_array(record, key)
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size == 0:
        raise PayloadError(f"{key!r} is {raw.dtype}{list(raw.shape)}, expected 1-D uint8 (UTF-8 names)")
    try:
        names = raw.tobytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise PayloadError(f"{key!r} is not UTF-8: {err}") from err
    if any(b <= a for a, b in zip(names, names[1:])):
        raise PayloadError(f"{key!r} names are not sorted and distinct")
    return names


def encoded_names(record: ArrayRecord) -> list[str]:
    """The names of the model arrays a quantized record carries (``NAMES_KEY``)."""
    return load_names(record, NAMES_KEY)


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


def _as_real_tensor(x: Tensor, name: str) -> torch.Tensor:
    """``x`` as a tensor (NumPy arrays without a copy), after checking its dtype is real.

    Finiteness is checked on the scales (``_quantize``), which NaN and inf make non-finite.
    """
    if isinstance(x, torch.Tensor):
        tensor = x
    else:  # torch takes any C-contiguous array as it is (np.ascontiguousarray would make 0-D arrays 1-D)
        x = np.asarray(x)
        tensor = torch.from_numpy(x if x.flags.c_contiguous and x.flags.writeable else x.copy())
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
    return tensor.detach() if tensor.is_floating_point() else tensor.to(torch.float64)


def _rows(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """``x`` as ``(C, N)``: one row per scale (per-channel: axis 0 of an array with ``ndim >= 2``)."""
    if granularity == "channel" and x.ndim >= 2:
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)


def _compute_scale(rows: torch.Tensor, qmax: int, *, mean: bool = False) -> torch.Tensor:
    """``float32`` scale per row: ``max|x| / qmax`` (``mean``: the mean of ``|x|``)."""
    if mean:
        magnitude = rows.abs().mean(dim=1).to(torch.float64)
    elif rows.shape[1] == 0:  # empty channels are well defined (scale 1, below)
        magnitude = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    else:
        # Two reads of x without a temporary: faster on CPU than |x| then amax, aminmax or a norm.
        magnitude = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_()).to(torch.float64)
    scale = (magnitude / qmax).to(torch.float32)
    # All-zero channels (or scales underflowing float32) get 1.0 so every
    # scale is finite and positive; their values quantize to 0 anyway.
    return scale.masked_fill_(scale <= 0, 1.0)


def _generator(
    stochastic: bool, rng: np.random.Generator | None, device: torch.device
) -> torch.Generator | None:
    """A torch generator on ``device`` seeded from ``rng`` for stochastic rounding; None to round to nearest."""
    if not stochastic:
        return None
    if rng is None:
        raise ValueError("stochastic rounding requires an `rng` (np.random.Generator)")
    return torch.Generator(device=device).manual_seed(int(rng.integers(2**63 - 1)))


def _allowed_scale_sizes(shape: tuple[int, ...]) -> set[int]:
    """Scale lengths valid for an array of ``shape``: 1, or C for ndim >= 2."""
    return {1, shape[0]} if len(shape) >= 2 else {1}


def load_array(record: ArrayRecord, key: str) -> np.ndarray:
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
    bits = load_array(record, BITS_KEY)
    if bits.dtype != np.uint8 or bits.shape != () or int(bits) not in CONTAINER_BITS:
        raise PayloadError(
            f"{BITS_KEY!r} is {bits.dtype}{list(bits.shape)} = {bits.tolist()}, expected a uint8 scalar in 1..4"
        )
    return int(bits)


def _load_codes(
    record: ArrayRecord, shapes: dict[str, tuple[int, ...]], bits: int
) -> dict[str, torch.Tensor]:
    """Every array's ``int8`` codes (unpacked for 4 bits or fewer), split from ``CODES_KEY`` in name order."""
    if CODES_KEY not in record:
        raise PayloadError(f"array {CODES_KEY!r} is missing from the payload")
    codes = load_array(record, CODES_KEY)
    packed = bits in CONTAINER_BITS
    lengths = {name: _code_bytes(shape, bits) for name, shape in shapes.items()}
    dtype = np.uint8 if packed else np.int8
    if codes.dtype != dtype or codes.shape != (sum(lengths.values()),):
        raise PayloadError(
            f"{CODES_KEY!r} is {codes.dtype}{list(codes.shape)}, expected {np.dtype(dtype)}"
            f"[{sum(lengths.values())}] for these {len(shapes)} arrays of {bits}-bit codes"
        )
    split, offset = {}, 0
    for name in sorted(shapes):
        part = codes[offset : offset + lengths[name]]
        offset += lengths[name]
        shape = shapes[name]
        split[name] = _unpack(part, bits, shape, name) if packed else torch.from_numpy(part).reshape(shape)
    return split


def _code_bytes(shape: tuple[int, ...], bits: int) -> int:
    """Bytes an array of ``shape`` takes in ``CODES_KEY``: one per int8 code, whole bytes of packed codes."""
    per_byte = 8 // CONTAINER_BITS[bits] if bits in CONTAINER_BITS else 1
    return -(-int(np.prod(shape, dtype=np.int64)) // per_byte)


def _load_scales(
    record: ArrayRecord, reference: dict[str, tuple[tuple[int, ...], str]]
) -> dict[str, np.ndarray]:
    """Split the packed scales into one ``(C,)`` or ``(1,)`` array per name."""
    if SCALES_KEY not in record:
        raise PayloadError(f"the payload has no {SCALES_KEY!r} array: it is not int8-encoded")
    packed = load_array(record, SCALES_KEY)
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
        # No code exceeds 128 in magnitude: bounding the scales bounds every decoded value,
        # without a pass over the decoded arrays.
        if (scale.astype(np.float64) * _LARGEST_CODE > np.finfo(np.float32).max).any():
            raise PayloadError(f"scale for array {name!r} is so large that its codes decode beyond float32")
        scales[name] = scale
    return scales
