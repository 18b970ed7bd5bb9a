"""How the global model travels to the clients (``strategy.downlink``), for every strategy.

The encoding (``strategies.encoding``) decides *what* is sent (the whole model,
UNet parts); this layer decides in which *form*:

* ``weights``: fp32 weights, as they are;
* ``int8_weights``: 8-bit codes of the weights, one fp32 scale per output
  channel (``strategies.codec``); every client decodes the same values;
* ``int8_delta``: a node whose training reply was accepted last round holds
  what it was sent then, the *view* v(t−1); it now gets 8-bit codes of
  w(t) − v(t−1) and rebuilds v(t) = v(t−1) + decode(codes). The server keeps
  v(t) as it computes the same sum (``apply_delta``, the one formula both
  sides use), so both hold it bit for bit; a hash of the base view and of
  the new view travels along, and a client refuses a change whose base it
  does not hold. Each change is taken against the view, not the last
  change, so quantization error does not accumulate. Any other node (new,
  sampled out, failed, late or left out last round, every node after a
  resume) gets v(t) as fp32 weights, counted in the bytes like the rest.
  When every client can rebuild the initial model from the run's seed (the
  server checks it can, see ``hold_initial``), that model is v(0), held by
  every node: round 1 sends its change too, with base round 0.

With ``int8_*`` clients start from the view v rather than w, so the server
decodes their updates and checks, clips and applies them against v
(``Prepared.base``). Evaluation messages take the same form as training
messages but never change the view: a holder of v(t) gets the change from
v(t) to the model being evaluated, and keeps v(t).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from strategies.codec import decode_arrays, encode_arrays
from strategies.encoding import Layer
from strategies.quant import reference_of, to_record

DOWNLINK_MODES = ("weights", "int8_weights", "int8_delta")
# Downlinks always travel as full 8-bit codes per output channel, whatever the update codes use.
DOWNLINK_BITS = 8
DOWNLINK_GRANULARITY = "channel"

# Keys of the training and evaluation ConfigRecord (absent with ``weights``).
MODE_KEY = "downlink"
VIEW_HASH_KEY = "downlink-view-hash"  # int8_delta: hash of what the client holds after decoding
VIEW_ROUND_KEY = "downlink-view-round"  # int8_delta: the round whose training message made that view
BASE_HASH_KEY = "downlink-base-hash"  # int8_delta, changes only: hash of the view the change applies to
BASE_ROUND_KEY = "downlink-base-round"


def view_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """blake2b (128 bits, hex) of the arrays' names, dtypes, shapes and bytes, in sorted name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The new view v(t) = v(t−1) + Δ, in the base's dtypes: the same numpy sum on server and clients."""
    return {name: np.add(base[name], delta[name], dtype=base[name].dtype) for name in base}


@dataclass
class Prepared:
    """One round's downlink: what travels, and the view the clients hold once they decoded it.

    ``payload`` is what Flower's strategy puts in every message; with
    ``int8_delta``, ``address`` then gives each node its own form: ``delta``
    (codes of the change) to the nodes that hold the last training round's view,
    ``full`` (the view as fp32 weights) to the others.
    """

    payload: ArrayRecord
    view: dict[str, np.ndarray]
    config: dict[str, int | str] = field(default_factory=dict)
    full: ArrayRecord | None = None
    delta: ArrayRecord | None = None
    base_config: dict[str, int | str] = field(default_factory=dict)

    def base(self, arrays: ArrayRecord) -> ArrayRecord:
        """The whole model the clients start from: ``arrays`` with the view for the arrays sent."""
        if not self.view or all(name not in self.view for name in arrays.keys()):
            return arrays
        return ArrayRecord(
            {name: Array(self.view[name]) if name in self.view else a for name, a in arrays.items()}
        )


class Downlink(Layer):
    """The form the global model travels in, and the view the clients hold (see the module docstring).

    Parameters
    ----------
    mode : str (default: "weights")
        ``weights``, ``int8_weights`` or ``int8_delta``.
    """

    def __init__(self, mode: str = "weights") -> None:
        if mode not in DOWNLINK_MODES:
            raise ValueError(f"downlink={mode!r} is not one of {DOWNLINK_MODES}")
        self.mode = mode
        # int8_delta: the view the last training round's nodes were sent, its hash and round,
        # and the nodes that hold it (their training reply of that round was accepted).
        self.view: dict[str, np.ndarray] | None = None
        self.view_hash = ""
        self.view_round = 0
        self.holders: set[int] = set()
        self.everyone_holds = False  # v(0): the initial model, which every client rebuilds from the seed

    @classmethod
    def from_config(cls, strategy: Mapping, **context: object) -> Downlink:
        """From ``strategy.downlink`` (``conf/schema.py``); a strategy config without it sends weights."""
        return cls(str(strategy.get("downlink", "weights")))

    def summary(self) -> list[str]:
        """The mode, when it is not plain weights."""
        return [] if self.mode == "weights" else [f"downlink: {self.mode} (8-bit codes per output channel)"]

    @classmethod
    def mode_privacy_conflict(cls, mode: str, privacy: str) -> str | None:
        """Why privacy ``privacy`` cannot work with downlink ``mode``; None if it can."""
        if mode == "weights":
            return None
        if privacy == "secagg":
            return (
                "SecAgg+ (Flower's legacy workflow) sends every node one fp32 model as its instructions "
                "and adds the unmasked mean update to that model"
            )
        if privacy == "dp_client":
            return (
                "Flower's fixedclipping_mod clips each reply against the arrays its message carried, and "
                "these carry int8 codes (of the weights or of their change), not the model"
            )
        return None  # dp_server clips each update against the view the client started from

    def hold_initial(self, arrays: Mapping[str, np.ndarray]) -> None:
        """``int8_delta``: every node holds ``arrays``, the initial model, because it rebuilds it from the seed.

        The first messages then carry the change since it (base round 0) rather
        than fp32 weights. Call it only before round 1 of a run that starts
        afresh, with the model the clients rebuild (``models.seeded_unet``).
        """
        if self.mode != "int8_delta":
            return
        self.view = {name: np.asarray(array) for name, array in arrays.items()}
        self.view_hash = view_hash(self.view)
        self.view_round = 0
        self.everyone_holds = True

    def _held_base(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The view the change of ``weights`` is taken against: the last view, or the parts of the initial
        model that are sent (partial exchange); None when the nodes hold nothing ``weights`` fits."""
        if self.view is None:
            return None
        if reference_of(self.view) == reference_of(weights):
            return self.view
        if self.view_round == 0 and set(weights) <= set(self.view):
            parts = {name: self.view[name] for name in weights}
            return parts if reference_of(parts) == reference_of(weights) else None
        return None

    # -- one round ---------------------------------------------------------------
    def prepare(self, payload: ArrayRecord, server_round: int) -> Prepared:
        """The downlink of ``payload`` (fp32 arrays to send) for ``server_round``; nothing is kept yet."""
        if self.mode == "weights":
            return Prepared(payload, {})
        weights = {name: array.numpy() for name, array in payload.items()}
        if self.mode == "int8_weights":
            codes, _ = encode_arrays(weights, bits=DOWNLINK_BITS, granularity=DOWNLINK_GRANULARITY)
            # Exactly what the clients decode: they train from it and send Δ against it.
            view = decode_arrays(codes, reference_of(weights))
            return Prepared(codes, view, {MODE_KEY: self.mode})
        base = self._held_base(weights)
        if base is None:
            view, delta, base_config = weights, None, {}  # nobody holds a base: full weights for all
        else:
            change = {name: w - base[name] for name, w in weights.items()}
            delta, _ = encode_arrays(change, bits=DOWNLINK_BITS, granularity=DOWNLINK_GRANULARITY)
            view = apply_delta(base, decode_arrays(delta, reference_of(base)))
            base_hash = self.view_hash if base is self.view else view_hash(base)
            base_config = {BASE_HASH_KEY: base_hash, BASE_ROUND_KEY: self.view_round}
        full = to_record(view)
        config = {MODE_KEY: self.mode, VIEW_HASH_KEY: view_hash(view), VIEW_ROUND_KEY: server_round}
        return Prepared(full, view, config, full=full, delta=delta, base_config=base_config)

    def configure(self, config: ConfigRecord, prepared: Prepared) -> None:
        """Add what clients need to read every message's arrays to ``config`` (in place)."""
        config.update(prepared.config)

    def address(self, messages: Iterable[Message], prepared: Prepared, arrays_key: str) -> list[Message]:
        """``int8_delta``: the change to the nodes that hold its base view, the full view to the others.

        Flower's messages share one RecordDict; the nodes of each form share one of their own.
        """
        messages = list(messages)
        if prepared.delta is None:
            return messages
        forms: dict[bool, RecordDict] = {}
        addressed = []
        for message in messages:
            holds_base = self.everyone_holds or message.metadata.dst_node_id in self.holders
            if holds_base not in forms:
                content = RecordDict(dict(message.content.items()))
                config = ConfigRecord(dict(message.content["config"]))
                if holds_base:
                    config.update(prepared.base_config)
                content["config"] = config
                content[arrays_key] = prepared.delta if holds_base else prepared.full
                forms[holds_base] = content
            addressed.append(
                Message(
                    content=forms[holds_base],
                    dst_node_id=message.metadata.dst_node_id,
                    message_type=message.metadata.message_type,
                )
            )
        return addressed

    def commit(self, prepared: Prepared) -> None:
        """A training round's downlink went out: its view is what its nodes now hold."""
        if self.mode == "int8_delta":
            self.view = prepared.view
            self.view_hash = str(prepared.config[VIEW_HASH_KEY])
            self.view_round = int(prepared.config[VIEW_ROUND_KEY])
            self.holders = set()  # until the round's replies say who holds it
            self.everyone_holds = False

    def observe(self, accepted: Iterable[Message]) -> None:
        """The nodes whose training reply was accepted hold this round's view; nobody else counts."""
        self.holders = {message.metadata.src_node_id for message in accepted}


__all__ = [
    "DOWNLINK_MODES",
    "Downlink",
    "Prepared",
    "apply_delta",
    "view_hash",
]
