"""Partial-UNet exchange (FedDiffuse; de Goede et al. 2024, arXiv 2406.12575).

Only some parts of the UNet (``models.parts``) travel; the presets are the
paper's:

* ``udec``: the decoder (up blocks and output head) is federated; the encoder
  (``conv_in``, time embedding, down blocks) and the mid block stay on each
  client across rounds, in its ``Context.state``, and are never sent;
* ``ulatdec``: the mid block and the decoder are federated; the encoder stays;
* ``usplit``: every part is federated and the server sends the whole model, but
  each client sends back only its share: clients are grouped ``split_ways`` at a
  time and each part of the model is sent by one member of each group
  (``models.parts.usplit_assignment``);
* ``custom``: ``shared`` lists the federated parts; the others stay local.

With local parts, every client holds its own model (shared parts from the
server, local parts of its own); the server's copy of the local parts is the
initial model, which each node receives once, the first time it is contacted.
The server averages each part over the replies that carry it (weighted by
``num-examples``). With ``quantize`` the replies carry int8 codes of the update
of what is sent (the codec of FedDM-quant), or with ``topk`` its largest
entries (``strategies.sparse``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

from models.parts import PRESETS, expand, names_in, parts_of
from strategies.accounting import check_full_weights, partition_of, single_array_record
from strategies.codec import PayloadError
from strategies.encoding import Encoding
from strategies.quant import (
    check_topk_mode,
    decode_update,
    quant_client_keys,
    reference_of,
    sent_names,
    to_numpy,
    to_record,
    topk_summary,
)

PARTIAL_PRESETS = (*PRESETS, "custom")
SAMPLES_KEY = "samples"  # ArrayRecord of client-generated images in evaluate replies
INITIALIZED_NODES = "partial.initialized_nodes"  # checkpoint key: nodes that hold local parts


class PartialParts(Encoding):
    """Chosen UNet parts travel and are averaged part by part; the other parts stay on the clients.

    Parameters
    ----------
    preset : str (default: "udec")
        ``udec``, ``ulatdec``, ``usplit`` or ``custom`` (see the module docstring).
    shared : list[str] | None
        ``custom`` only: the federated parts (``up_blocks``, ``mid_block``, ...).
    split_ways : int (default: 2)
        ``usplit`` only: clients per group that together send one model.
    quantize : bool (default: False)
        Replies carry int8 codes of the update (FedDM-quant's codec).
    bits, granularity, stochastic_rounding, error_feedback, topk, topk_values
        As in ``Int8Updates``, when ``quantize`` is on (``topk`` needs it: it
        sparsifies the update, and without ``quantize`` weights travel).
    seed : int (default: 0)
        Seeds the USplit assignment.
    client_generation : dict | None
        At evaluation rounds, ask clients with local parts for generated images
        (``sample-count``, ``sample-seed``, ``sample-ddim-steps``,
        ``sample-batch-size``, ``sample-shape``), for FID of their own models.
    """

    def __init__(
        self,
        *,
        preset: str = "udec",
        shared: list[str] | None = None,
        split_ways: int = 2,
        quantize: bool = False,
        bits: int = 8,
        granularity: str = "channel",
        stochastic_rounding: bool = False,
        error_feedback: bool = False,
        topk: float = 0.0,
        topk_values: str = "quantized",
        seed: int = 0,
        client_generation: dict | None = None,
    ) -> None:
        if preset not in PARTIAL_PRESETS:
            raise ValueError(f"preset={preset!r} is not one of {PARTIAL_PRESETS}")
        if (preset == "custom") != bool(shared):
            raise ValueError("shared lists the federated parts with preset=custom, and only then")
        if preset == "usplit" and split_ways < 2:
            raise ValueError(f"split_ways={split_ways} must be >= 2")
        if topk and not quantize:
            raise ValueError(
                f"strategy.topk={topk} needs strategy.quantize=true: top-k sparsifies the update, and with "
                "strategy.quantize=false the replies are weights"
            )
        self.preset = preset
        self.selection = list(shared) if preset == "custom" else list(PRESETS[preset])
        self.split_ways = split_ways if preset == "usplit" else 0
        self.quantize = quantize
        self.decodes_updates = quantize  # int8 codes of the update of what is sent
        self.quant_config = (
            quant_client_keys(bits, granularity, stochastic_rounding, error_feedback, topk, topk_values)
            if quantize
            else {}
        )
        self.seed = seed
        self.client_generation = client_generation
        self.shared_parts: list[str] = []
        self.shared_names: list[str] = []
        self.personalized = False
        self._initialized: set[int] = set()  # nodes that keep local parts
        self.client_samples: dict[int, dict[int, np.ndarray]] = {}

    @classmethod
    def from_config(
        cls,
        strategy: Mapping[str, Any],
        *,
        seed: int = 0,
        client_generation: dict | None = None,
        **context: Any,
    ) -> PartialParts:
        """From the ``strategy=partial`` config, with the run's seed and what clients generate for FID."""
        return cls(
            preset=str(strategy["preset"]),
            shared=list(strategy["shared"]) if strategy.get("shared") else None,
            split_ways=int(strategy["split_ways"]),
            quantize=bool(strategy["quantize"]),
            bits=int(strategy["bits"]),
            granularity=str(strategy["granularity"]),
            stochastic_rounding=bool(strategy["stochastic_rounding"]),
            error_feedback=bool(strategy["error_feedback"]),
            # Hand-built configs (tests, benchmarks) may leave top-k out: off.
            topk=float(strategy.get("topk", 0.0)),
            topk_values=str(strategy.get("topk_values", "quantized")),
            seed=seed,
            client_generation=client_generation,
        )

    # -- what is shared ---------------------------------------------------------
    def resolve(self, arrays: ArrayRecord) -> None:
        """Fix the shared parts and parameter names for this model."""
        if not self.shared_names:
            names = list(arrays.keys())
            self.shared_parts = expand(self.selection, names)
            self.shared_names = names_in(self.shared_parts, names)
            # Parts left on the clients: each client then has a model of its own.
            self.personalized = len(self.shared_names) < len(names)

    def summary(self) -> list[str]:
        """The shared parts, the split, the codec."""
        lines = [f"FedDM-partial ({self.preset}): shared parts {self.selection}"]
        if self.split_ways:
            lines.append(f"each part sent by one of every {self.split_ways} clients")
        if self.quantize:
            lines.append(f"int8 updates: {self.quant_config}")
            lines += topk_summary(self.quant_config)
        return lines

    @classmethod
    def privacy_conflict(cls, mode: str) -> str | None:
        """Replies hold parts that differ between clients (and local parts stay unprotected)."""
        return "its replies hold parts that differ between clients"

    @classmethod
    def aggregator_conflict(cls, aggregator: Any) -> str | None:
        """Parts are averaged over the replies that carry them: only the plain mean does that."""
        if aggregator.kind == "mean":
            return None
        name = aggregator.flower_class.__name__
        return f"it averages each UNet part over the replies that carry it, and {name} needs whole models"

    # -- training ---------------------------------------------------------------
    def train_config(self, config: ConfigRecord, arrays: ArrayRecord) -> None:
        """Tell clients what is shared (and how to encode it)."""
        self.resolve(arrays)
        config["partial-shared"] = json.dumps(self.shared_parts)
        config["partial-split-ways"] = self.split_ways
        config["partial-seed"] = self.seed
        config.update(self.quant_config)

    def downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        """The shared parts (USplit: the whole model)."""
        self.resolve(arrays)
        return ArrayRecord({name: arrays[name] for name in self.shared_names})

    def address(self, messages: list[Message], arrays: ArrayRecord, arrays_key: str) -> list[Message]:
        """A node that holds no local parts yet gets the whole model (its local parts' start).

        A node holds them once it has answered a training message; a node whose
        training failed (it may have lost its state) gets the whole model again.
        """
        addressed = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self._initialized:
                # Flower's messages share one RecordDict: give this one its own.
                content = RecordDict(dict(message.content.items()))
                content[arrays_key] = arrays
                message = Message(
                    content=content, dst_node_id=node, message_type=message.metadata.message_type
                )
            addressed.append(message)
        return addressed

    def state_dict(self) -> dict:
        """The nodes that hold local parts: after a resume they get the shared parts only, as before."""
        return {INITIALIZED_NODES: sorted(self._initialized)} if self._initialized else {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`."""
        self._initialized = {int(node) for node in state.get(INITIALIZED_NODES, [])}

    def decode(self, message: Message, global_arrays: ArrayRecord) -> ArrayRecord:
        """Validate the reply: whole shared parts only, as weights (or int8 or top-k update codes)."""
        record = single_array_record(message)
        check_topk_mode(record, self.quant_config)
        names = sent_names(record)
        unknown = sorted(set(names) - set(self.shared_names))
        if unknown:
            raise PayloadError(f"arrays that are not shared: {unknown[:5]}")
        sent_parts = parts_of(names)
        partial = [p for p in sent_parts if not set(names_in([p], self.shared_names)) <= set(names)]
        if not sent_parts or partial:
            raise PayloadError(f"the reply must hold whole shared parts; incomplete: {partial or 'all'}")
        expected = names_in(sent_parts, self.shared_names)
        reference = ArrayRecord({n: global_arrays[n] for n in expected})
        if self.quantize:
            return to_record(decode_update(record, reference_of(reference), self.quant_config))
        return check_full_weights(record, reference)

    def average(
        self, strategy: Any, server_round: int, errors: list[Message], accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each part averaged over the replies that carry it, weighted by ``num-examples``."""
        # A node that trained keeps its local parts; one that failed may not.
        self._initialized |= {m.metadata.src_node_id for m in accepted}
        self._initialized -= {m.metadata.src_node_id for m in errors}
        metrics = strategy.train_metrics_aggr_fn([m.content for m in accepted], strategy.weighted_by_key)
        averaged: dict = {}
        for part in self.shared_parts:
            names = names_in([part], self.shared_names)
            carriers = [m.content for m in accepted if names[0] in m.content["arrays"]]
            if not carriers:
                continue  # nobody sent this part: it keeps its global value
            restricted = [
                RecordDict(
                    {"arrays": ArrayRecord({n: c["arrays"][n] for n in names}), "metrics": c["metrics"]}
                )
                for c in carriers
            ]
            averaged.update(aggregate_arrayrecords(restricted, strategy.weighted_by_key).items())
        return ArrayRecord(averaged), metrics

    def apply(self, aggregated: ArrayRecord, global_arrays: ArrayRecord) -> ArrayRecord:
        """The global model with the averaged parts replaced (or, quantized, moved by the mean update)."""
        weights = to_numpy(global_arrays)
        for name, value in to_numpy(aggregated).items():
            dtype = weights[name].dtype
            weights[name] = (weights[name] + value if self.quantize else value).astype(dtype)
        return to_record(weights)

    # -- evaluation -------------------------------------------------------------
    def evaluate_config(self, config: ConfigRecord, arrays: ArrayRecord) -> ConfigRecord:
        """Clients with local parts evaluate their own model and, for FID, sample from it."""
        self.resolve(arrays)
        config = ConfigRecord(dict(config))
        config["partial-shared"] = json.dumps(self.shared_parts)
        if self.personalized and self.client_generation:
            config.update(self.client_generation)
        return config

    def evaluate_replies(self, server_round: int, replies: Iterable[Message]) -> None:
        """Keep the clients' generated images of ``server_round`` (checked)."""
        samples = {}
        for message in replies:
            if (
                not self.client_generation
                or message.has_error()
                or SAMPLES_KEY not in message.content.array_records
            ):
                continue
            try:
                samples[partition_of(message)] = self._checked_samples(message.content[SAMPLES_KEY])
            except PayloadError as err:
                log(
                    INFO,
                    "Round %d: left out the samples of node %d: %s",
                    server_round,
                    message.metadata.src_node_id,
                    err,
                )
        if samples and self.personalized:
            self.client_samples[server_round] = dict(sorted(samples.items()))

    def _checked_samples(self, record: ArrayRecord) -> np.ndarray:
        expected = (
            int(self.client_generation["sample-count"]),
            *json.loads(self.client_generation["sample-shape"]),
        )
        try:
            images = record["images"].numpy()
        except (KeyError, TypeError, ValueError) as err:
            raise PayloadError(f"no readable 'images' array: {err}") from err
        if images.dtype != np.uint8 or images.shape != expected:
            raise PayloadError(
                f"images are {images.dtype}{list(images.shape)}, expected uint8{list(expected)}"
            )
        return images


__all__ = ["PARTIAL_PRESETS", "SAMPLES_KEY", "PartialParts"]
