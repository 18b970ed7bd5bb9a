"""A client's side of the downlink (``strategy.downlink``, ``strategies.downlink``): the model as sent.

Whatever form the server chose, the client turns the message's arrays into
fp32 arrays before anything else looks at them: fp32 weights as they are (or
unpacked, ``strategies.packing``), int8
codes of the weights decoded, and with ``int8_delta`` the change applied to
the view this client kept from the last round it trained. The view, what the
server sent it then as this client decoded it, lives in the client's state
(``VIEW_KEY``, with its round and hash in ``VIEW_INFO_KEY``; kept on disk with
``client_state=disk``). A change since round 0 applies to the initial model,
which the client rebuilds from the run's seed instead. Both hashes the server
sends are checked: a client never trains from a model other than the one the
server decodes its reply against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client_app.partial import shared_names, wants_partial
from strategies.codec import decode_arrays, encoded_names, is_quantized
from strategies.downlink import (
    BASE_HASH_KEY,
    BASE_ROUND_KEY,
    MODE_KEY,
    VIEW_HASH_KEY,
    VIEW_ROUND_KEY,
    apply_delta,
    view_hash,
)
from strategies.packing import unpacked
from strategies.quant import reference_of, to_record

VIEW_KEY = "feddm-downlink-view"  # int8_delta: the arrays this client was last sent for training, decoded
VIEW_INFO_KEY = "feddm-downlink-view-info"  # their round and hash


class DownlinkMismatchError(RuntimeError):
    """The change the server sent does not apply to what this client holds, or gives another model."""


def received_arrays(
    record: ArrayRecord,
    config: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor],
    state: RecordDict,
    *,
    keep: bool,
    initial: Callable[[], Mapping[str, np.ndarray]] | None = None,
) -> ArrayRecord:
    """The message's arrays as fp32 weights (all, or the parts sent), whatever form they travelled in.

    ``model_state`` (the freshly built model's state dict) gives the shapes of
    int8 weight codes; ``keep`` (training messages) stores an ``int8_delta``
    view in ``state`` for the next change; evaluation leaves it as it was.
    ``initial`` rebuilds the run's initial model (from its seed), the base of a
    change since round 0. Raises ``DownlinkMismatchError`` when a hash does not match, and the codec's
    ``PayloadError`` for malformed codes.
    """
    record = unpacked(record)  # fp32 arrays may travel packed (strategies.packing)
    mode = config.get(MODE_KEY)
    if mode != "int8_delta":
        if not is_quantized(record):
            return record
        names = encoded_names(record)
        unknown = [n for n in names if n not in model_state]
        if unknown:
            raise DownlinkMismatchError(f"the server sent codes of arrays this model lacks: {unknown[:5]}")
        reference = {n: (tuple(model_state[n].shape), _numpy_dtype(model_state[n])) for n in names}
        return to_record(decode_arrays(record, reference))
    if is_quantized(record):  # the change since this client's view
        base = _base_view(config, state, encoded_names(record), initial)
        view = arrays = apply_delta(base, decode_arrays(record, reference_of(base)))
    else:  # fp32 weights: the whole model or the parts sent; the view is what later changes apply to
        arrays = {name: array.numpy() for name, array in record.items()}
        names = shared_names(config, list(model_state)) if wants_partial(config) else list(arrays)
        view = {name: arrays[name] for name in names}
    expected = str(config[VIEW_HASH_KEY])
    if view_hash(view) != expected:
        raise DownlinkMismatchError(
            f"the model decoded from round {config[VIEW_ROUND_KEY]}'s message has hash {view_hash(view)[:16]}, "
            f"the server's has {expected[:16]}: the client's and the server's codec disagree"
        )
    if keep:
        state[VIEW_KEY] = to_record(view)
        state[VIEW_INFO_KEY] = ConfigRecord({"round": int(config[VIEW_ROUND_KEY]), "hash": expected})
    return to_record(arrays)


def _numpy_dtype(tensor: torch.Tensor) -> str:
    """The numpy dtype of ``tensor``'s values (wherever the tensor lives)."""
    return str(torch.empty((), dtype=tensor.dtype).numpy().dtype)


def _base_view(
    config: Mapping[str, Any],
    state: RecordDict,
    names: list[str],
    initial: Callable[[], Mapping[str, np.ndarray]] | None,
) -> dict[str, np.ndarray]:
    """The view the server's change (of arrays ``names``) applies to, once its hash is checked."""
    base_round, expected = config.get(BASE_ROUND_KEY), config.get(BASE_HASH_KEY)
    if base_round is not None and int(base_round) == 0:
        return _initial_view(expected, names, initial)
    if VIEW_KEY not in state:
        raise DownlinkMismatchError(
            f"the server sent the change of its model since round {base_round}, but this client holds no "
            "model from an earlier round (its state was lost, e.g. the SuperNode restarted)"
        )
    base = {name: array.numpy() for name, array in state[VIEW_KEY].items()}
    held = view_hash(base)
    if held != expected:
        info = state.config_records.get(VIEW_INFO_KEY, {})
        raise DownlinkMismatchError(
            f"the server sent the change since the model of round {base_round} (hash {str(expected)[:16]}), but "
            f"this client holds the model of round {info.get('round', '?')} (hash {held[:16]})"
        )
    return base


def _initial_view(
    expected: Any, names: list[str], initial: Callable[[], Mapping[str, np.ndarray]] | None
) -> dict[str, np.ndarray]:
    """The initial model's arrays ``names``, rebuilt from the run's seed, once their hash is checked."""
    if initial is None:
        raise DownlinkMismatchError(
            "the server sent the change since the initial model, which this client cannot rebuild"
        )
    model = initial()
    missing = [name for name in names if name not in model]
    if missing:
        raise DownlinkMismatchError(
            f"the server sent the change of arrays the initial model lacks: {missing[:5]}"
        )
    base = {name: np.asarray(model[name]) for name in names}
    held = view_hash(base)
    if held != expected:
        raise DownlinkMismatchError(
            f"the initial model rebuilt from the run's seed has hash {held[:16]}, the server's {str(expected)[:16]}: "
            "the client's torch or diffusers initialises the UNet differently from the server's"
        )
    return base


__all__ = ["VIEW_INFO_KEY", "VIEW_KEY", "DownlinkMismatchError", "received_arrays"]
