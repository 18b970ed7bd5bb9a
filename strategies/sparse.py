"""Top-k sparsification of model updates, with optionally quantized values.

The single implementation shared by clients (encode an update), the server
(decode a reply), tests and benchmarks. Per tensor, the ``k = keep_count(numel,
fraction)`` entries of largest magnitude travel (ties: the lower flat index
first); the rest stays with the client as its error-feedback residual, to be
added to the next update, so that what is not sent this round is sent later.

Because ``k`` follows from the fraction and the shapes, the receiver knows
every count, and a message holds a handful of arrays whatever the number of
tensors (Flower frames every array, about 450 bytes each):

* ``TOPK_KEY``: the sent tensors' names, sorted, joined by ``\\n``, as UTF-8
  ``uint8``; it marks the record as top-k and says which tensors travel (a
  partial-exchange reply sends some of them);
* ``INDICES_KEY`` or ``BITMAP_KEY``, whichever is smaller: the kept positions
  (flat, local to each tensor) in name order. ``INDICES_KEY`` holds their gaps,
  the first gap of a tensor being its first index, so that they fit ``uint16``
  (else ``uint32``); ``BITMAP_KEY`` holds one bit per entry of every tensor,
  concatenated, packed eight per byte, lowest bit first (cheaper above about
  1/16 of the entries kept);
* ``VALUES_KEY``: the kept values in the same order, ``float32``; or, with
  quantized values, their codes from ``strategies.codec`` (one scale per
  tensor: ``int8`` for 5-8 bits, packed ``uint8`` with the codec's ``BITS_KEY``
  for 4 or fewer) and every scale in the codec's ``SCALES_KEY``.

Only NumPy and ``flwr.app``; nothing is pickled.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.codec import (
    BITS_KEY,
    CODEC_KEYS,
    SCALES_KEY,
    PayloadError,
    load_array,
    load_names,
    names_array,
    pack_codes,
    quantize,
    unpack_codes,
)

TOPK_KEY = "@topk"
"""Key of the sorted names of the sent tensors (UTF-8 bytes); marks a top-k record."""
INDICES_KEY = "@indices"
"""Key of the kept positions as gaps (``uint16`` or ``uint32``), tensors in name order."""
BITMAP_KEY = "@bitmap"
"""Key of the kept positions as a packed bitmap over every entry (``uint8``), tensors in name order."""
VALUES_KEY = "@values"
"""Key of the kept values: ``float32``, or codes with the codec's ``SCALES_KEY`` (and ``BITS_KEY``)."""

TOPK_KEYS = (TOPK_KEY, INDICES_KEY, BITMAP_KEY, VALUES_KEY)
"""The entries of a top-k record that are not the codec's; none may name a model array."""
TOPK_VALUES = ("quantized", "float32")
"""How kept values travel: codes of ``bits`` bits (one scale per tensor), or float32."""

# Widest packed code width: the codec packs 4 bits and fewer (its BITS_KEY is present then).
_PACKED_BITS = 4
# A product fraction·numel within this of an integer counts as that integer (float rounding).
_COUNT_TOLERANCE = 1e-6


def keep_count(numel: int, fraction: float) -> int:
    """Entries kept of a tensor of ``numel`` entries: ``max(1, ceil(fraction · numel))``.

    A product within 1e-6 of an integer counts as that integer, so that e.g.
    0.07 x 100 keeps 7 entries, not 8, whatever float rounding gives.
    """
    return min(numel, max(1, math.ceil(fraction * numel - _COUNT_TOLERANCE)))


def top_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat positions of the ``k`` entries of largest magnitude (ties: lower positions first)."""
    if k >= flat.size:
        return np.arange(flat.size, dtype=np.int64)
    magnitude = np.abs(flat)
    threshold = np.partition(magnitude, flat.size - k)[flat.size - k]
    above = np.flatnonzero(magnitude > threshold)
    ties = np.flatnonzero(magnitude == threshold)[: k - above.size]
    return np.union1d(above, ties).astype(np.int64)


def encode_topk(
    arrays: dict[str, np.ndarray],
    fraction: float,
    *,
    values: str = "quantized",
    bits: int = 8,
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """The top-k record of named arrays (the module docstring gives its layout), and the residuals.

    Parameters
    ----------
    arrays : dict[str, np.ndarray]
        Finite real arrays (updates) by name; names must not be reserved
        (``TOPK_KEYS``, the codec's keys) nor hold a newline.
    fraction : float
        Fraction of each tensor's entries kept, in (0, 1).
    values : str (default: "quantized")
        ``"quantized"``: codes of ``bits`` bits, one scale per tensor; ``"float32"``.
    bits, stochastic, rng
        As in ``strategies.codec.quantize`` (quantized values only); one
        ``rng`` is consumed in name order.

    Returns
    -------
    tuple[ArrayRecord, dict[str, np.ndarray]]
        The record, and per name the ``float32`` residual: the array minus what
        the receiver decodes (the unsent entries, and the kept values' rounding
        error), which the client keeps for error feedback.
    """
    _check_settings(fraction, values)
    names = sorted(arrays)
    if not names:
        raise ValueError("top-k needs at least one array to encode")
    for name in names:
        if name in TOPK_KEYS or name in CODEC_KEYS or "\n" in name:
            raise ValueError(f"array name {name!r} is reserved for the codec or holds a newline")
    flats, residuals, positions, kept = {}, {}, [], []
    for name in names:
        x = np.asarray(arrays[name])
        if x.size == 0 or not np.isfinite(x).all():
            raise ValueError(f"tensor {name!r} is empty or holds non-finite values")
        flats[name] = x.astype(np.float32).reshape(-1)
        positions.append(top_indices(flats[name], keep_count(x.size, fraction)))
        kept.append(flats[name][positions[-1]])
    entries = {TOPK_KEY: names_array(names)}
    entries.update(_position_entries(positions, [flats[n].size for n in names]))
    if values == "float32":
        entries[VALUES_KEY] = Array(np.concatenate(kept))
        sent = kept
    else:
        coded = [quantize(v, bits=bits, granularity="tensor", stochastic=stochastic, rng=rng) for v in kept]
        codes = np.concatenate([q.values for q in coded])
        scales = np.concatenate([q.scale for q in coded])
        entries[VALUES_KEY] = Array(pack_codes(codes, bits) if bits <= _PACKED_BITS else codes)
        entries[SCALES_KEY] = Array(scales)
        if bits <= _PACKED_BITS:
            entries[BITS_KEY] = Array(np.asarray(bits, dtype=np.uint8))
        sent = np.split(
            _restore(codes, scales, [v.size for v in kept]), np.cumsum([v.size for v in kept])[:-1]
        )
    for name, where, value in zip(names, positions, sent):
        residual = flats[name].copy()
        residual[where] -= value
        residuals[name] = residual.reshape(np.shape(arrays[name]))
    return ArrayRecord(entries), residuals


def is_topk(record: ArrayRecord) -> bool:
    """Return ``True`` if the record is a top-k record (has ``TOPK_KEY``)."""
    return TOPK_KEY in record


def topk_names(record: ArrayRecord) -> list[str]:
    """The names of the tensors a top-k record carries, checked to be sorted and distinct."""
    if TOPK_KEY not in record:
        raise PayloadError(f"the payload has no {TOPK_KEY!r} array: it is not a top-k record")
    return load_names(record, TOPK_KEY)


def decode_topk(
    record: ArrayRecord,
    reference: dict[str, tuple[tuple[int, ...], str]],
    fraction: float,
    *,
    values: str | None = None,
) -> dict[str, np.ndarray]:
    """Validate a received top-k record and return dense arrays, zero where nothing was sent.

    Parameters
    ----------
    record : ArrayRecord
        Payload produced by ``encode_topk`` (possibly by another party).
    reference : dict[str, tuple[tuple[int, ...], str]]
        Expected arrays: ``name -> (shape, dtype)``; the record must carry exactly these.
    fraction : float
        The fraction the sender was asked to keep: it fixes every count.
    values : str | None (default: None)
        The values the sender was asked for (``TOPK_VALUES``); None accepts either.

    Returns
    -------
    dict[str, np.ndarray]
        Dense arrays in ``reference`` order, with its shapes and dtypes.

    Raises
    ------
    PayloadError
        Naming the array and the reason: missing, unexpected or unknown arrays;
        wrong dtypes or lengths; positions out of range or not strictly
        increasing within a tensor; counts that do not match ``fraction``;
        values of the other kind; bad scales or codes; non-finite values.
    """
    _check_settings(fraction, values or TOPK_VALUES[0])
    names = topk_names(record)
    missing = [name for name in reference if name not in set(names)]
    if missing:
        raise PayloadError(f"array {missing[0]!r} is missing from the payload ({len(missing)} missing)")
    unexpected = sorted(set(names) - set(reference))
    if unexpected:
        raise PayloadError(f"unexpected array(s) in payload: {', '.join(unexpected[:5])}")
    shapes = [tuple(int(d) for d in reference[name][0]) for name in names]
    sizes = [math.prod(shape) for shape in shapes]
    if 0 in sizes:
        raise PayloadError(f"array {names[sizes.index(0)]!r} is empty: empty arrays are not encoded")
    counts = [keep_count(size, fraction) for size in sizes]
    kind = _check_keys(record, values)
    positions = _load_positions(record, names, sizes, counts)
    kept = _load_values(record, kind, names, counts)
    decoded = {}
    for name, shape, size, where, value in zip(
        names, shapes, sizes, positions, np.split(kept, np.cumsum(counts)[:-1])
    ):
        dense = np.zeros(size, dtype=np.float32)
        dense[where] = value
        decoded[name] = dense.reshape(shape).astype(np.dtype(reference[name][1]), copy=False)
        if not np.isfinite(decoded[name]).all():  # finite codes and scales can still overflow
            raise PayloadError(f"array {name!r} decodes to non-finite values")
    return {name: decoded[name] for name in reference}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _check_settings(fraction: float, values: str) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"the top-k fraction must be a number in (0, 1), got {fraction!r}")
    if values not in TOPK_VALUES:
        raise ValueError(f"top-k values must be one of {TOPK_VALUES}, got {values!r}")


def _restore(codes: np.ndarray, scales: np.ndarray, counts: list[int]) -> np.ndarray:
    """``float32`` values of concatenated codes, each tensor's run times its one scale.

    The sender computes its residuals with this very function, so they complete
    exactly what the receiver decodes.
    """
    with np.errstate(over="ignore"):  # a hostile scale can overflow: the decoder reports non-finite values
        return codes.astype(np.float32) * np.repeat(scales.astype(np.float32), counts)


def _position_entries(positions: list[np.ndarray], sizes: list[int]) -> dict[str, Array]:
    """The kept positions as gaps (``INDICES_KEY``) or a bitmap (``BITMAP_KEY``), whichever is smaller."""
    gaps = np.concatenate([np.diff(p, prepend=0) for p in positions])
    if gaps.max(initial=0) >= 2**32:
        raise ValueError("a tensor has 2**32 entries or more: its positions do not fit uint32")
    gaps = gaps.astype(np.uint16 if gaps.max(initial=0) < 2**16 else np.uint32)
    if -(-sum(sizes) // 8) >= gaps.nbytes:
        return {INDICES_KEY: Array(gaps)}
    mask = np.zeros(sum(sizes), dtype=bool)
    offsets = np.cumsum([0, *sizes[:-1]])
    mask[np.concatenate([p + o for p, o in zip(positions, offsets)])] = True
    return {BITMAP_KEY: Array(np.packbits(mask, bitorder="little"))}


def _check_keys(record: ArrayRecord, values: str | None) -> str:
    """The record's value kind (``TOPK_VALUES``), after checking it holds exactly the entries that kind needs."""
    keys = set(record.keys())
    kind = "quantized" if SCALES_KEY in keys else "float32"
    if values is not None and kind != values:
        raise PayloadError(f"{VALUES_KEY!r} holds {kind} values, but {values} values were asked for")
    if (INDICES_KEY in keys) == (BITMAP_KEY in keys):
        raise PayloadError(f"a top-k payload holds exactly one of {INDICES_KEY!r} and {BITMAP_KEY!r}")
    needed = {TOPK_KEY, VALUES_KEY, INDICES_KEY if INDICES_KEY in keys else BITMAP_KEY}
    if kind == "quantized":
        needed |= {SCALES_KEY} | ({BITS_KEY} if BITS_KEY in keys else set())
    if VALUES_KEY not in keys:
        raise PayloadError(f"array {VALUES_KEY!r} is missing from the payload")
    extra = sorted(keys - needed)
    if extra:
        raise PayloadError(f"unexpected array(s) in payload: {', '.join(extra[:5])}")
    return kind


def _load_positions(
    record: ArrayRecord, names: list[str], sizes: list[int], counts: list[int]
) -> list[np.ndarray]:
    """Per tensor, its kept flat positions: ``counts`` of them, strictly increasing, below its size."""
    if BITMAP_KEY in record:
        return _load_bitmap(record, names, sizes, counts)
    gaps = load_array(record, INDICES_KEY)
    total = sum(counts)
    if gaps.dtype not in (np.uint16, np.uint32) or gaps.shape != (total,):
        raise PayloadError(
            f"{INDICES_KEY!r} is {gaps.dtype}{list(gaps.shape)}, expected uint16 or uint32[{total}] "
            "(the counts the top-k fraction gives these arrays)"
        )
    positions = []
    for name, size, run in zip(names, sizes, np.split(gaps.astype(np.int64), np.cumsum(counts)[:-1])):
        if (run[1:] == 0).any():
            raise PayloadError(f"{INDICES_KEY!r}: positions of array {name!r} are not strictly increasing")
        where = np.cumsum(run)
        if where[-1] >= size:
            raise PayloadError(f"{INDICES_KEY!r}: a position of array {name!r} is out of range (size {size})")
        positions.append(where)
    return positions


def _load_bitmap(
    record: ArrayRecord, names: list[str], sizes: list[int], counts: list[int]
) -> list[np.ndarray]:
    """Kept positions from the bitmap, checking its length, its zero padding and each tensor's count."""
    bitmap, total = load_array(record, BITMAP_KEY), sum(sizes)
    expected = -(-total // 8)
    if bitmap.dtype != np.uint8 or bitmap.shape != (expected,):
        raise PayloadError(
            f"{BITMAP_KEY!r} is {bitmap.dtype}{list(bitmap.shape)}, expected uint8[{expected}] "
            f"(one bit for each of {total} entries)"
        )
    mask = np.unpackbits(bitmap, bitorder="little")
    if mask[total:].any():
        raise PayloadError(f"{BITMAP_KEY!r} has non-zero padding after its {total} bits")
    positions = []
    for name, run, count in zip(names, np.split(mask[:total], np.cumsum(sizes)[:-1]), counts):
        where = np.flatnonzero(run)
        if where.size != count:
            raise PayloadError(
                f"{BITMAP_KEY!r} marks {where.size} entries of array {name!r}, expected {count} "
                "(the top-k fraction)"
            )
        positions.append(where)
    return positions


def _load_values(record: ArrayRecord, kind: str, names: list[str], counts: list[int]) -> np.ndarray:
    """The kept values, concatenated: float32 as sent, or codes restored with their scales."""
    raw, total = load_array(record, VALUES_KEY), sum(counts)
    if kind == "float32":
        if raw.dtype != np.float32 or raw.shape != (total,):
            raise PayloadError(f"{VALUES_KEY!r} is {raw.dtype}{list(raw.shape)}, expected float32[{total}]")
        if not np.isfinite(raw).all():
            raise PayloadError(f"{VALUES_KEY!r} holds non-finite values")
        return raw
    scales = load_array(record, SCALES_KEY)
    if scales.dtype != np.float32 or scales.shape != (len(names),):
        raise PayloadError(
            f"{SCALES_KEY!r} is {scales.dtype}{list(scales.shape)}, expected float32[{len(names)}] "
            "(one scale per array)"
        )
    bad = np.flatnonzero(~np.isfinite(scales) | (scales <= 0))
    if bad.size:
        raise PayloadError(f"scale for array {names[bad[0]]!r} is not finite and positive")
    if BITS_KEY in record:
        bits = load_array(record, BITS_KEY)
        if bits.dtype != np.uint8 or bits.shape != () or not 1 <= int(bits) <= _PACKED_BITS:
            raise PayloadError(
                f"{BITS_KEY!r} is {bits.dtype}{list(bits.shape)}, expected a uint8 scalar in 1..4"
            )
        codes = unpack_codes(raw, int(bits), (total,), VALUES_KEY)
    elif raw.dtype != np.int8 or raw.shape != (total,):
        raise PayloadError(f"{VALUES_KEY!r} is {raw.dtype}{list(raw.shape)}, expected int8[{total}] codes")
    else:
        codes = raw
    return _restore(codes, scales, counts)


__all__ = [
    "BITMAP_KEY",
    "INDICES_KEY",
    "TOPK_KEY",
    "TOPK_KEYS",
    "TOPK_VALUES",
    "VALUES_KEY",
    "decode_topk",
    "encode_topk",
    "is_topk",
    "keep_count",
    "top_indices",
]
