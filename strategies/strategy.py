"""A FedDM strategy: a Flower strategy with FedDM's layers on top.

``FedDMStrategy`` is a mixin placed before the Flower strategy class that
aggregates (``strategies.aggregators``); ``strategies.build_strategy`` makes
the composed class. Its layers, each chosen by config:

* the **encoding** (``strategies.encoding``): what travels and how a reply
  becomes averageable arrays (full weights, int8 update codes, UNet parts);
* the **downlink** (``strategies.downlink``): the form the model travels in
  (fp32 weights, their int8 codes, int8 codes of their change) and the view
  the clients start from, against which replies are decoded and applied;
* **privacy**: central DP (``strategies.privacy.CentralDP``) or SecAgg+
  (``strategies.secagg.SecAggPlus``), or neither;
* server-side **extras**, e.g. FedDDPM's calibration (``strategies.fedddpm``).

Around them it

* counts the bytes of the arrays actually placed in the messages, both ways;
* checks every training reply against the global model before it reaches the
  average, and leaves out (with a logged reason) the ones that do not match;
* aggregates the replies that arrived by the round's deadline (Flower's
  ``timeout``, ``round_timeout_s``), counting the messages that got no reply by
  then (``num_late``) and the error replies (``num_failed``), and fails the
  round when fewer than ``min_replies`` replies can be aggregated;
* keeps the aggregated metrics per round in ``round_log`` for the ServerApp,
  with the wall time of each round's training phase (``train_time_s``);
* asks clients to evaluate only on evaluation rounds (``evaluate_every``);
* with ``sampling``, lets Flower draw the round's clients reproducibly and logs
  their partitions (``strategies.sampling``);
* numbers rounds truly after a resume (``load_state_dict``).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.supercore import log

from strategies.accounting import (
    RoundFailedError,
    check_metrics,
    last_line,
    message_nbytes,
    partition_of,
    reply_order,
    single_array_record,
)
from strategies.aggregators import (
    AGGREGATORS,
    Aggregator,
    like_global,
    load_optimizer_state,
    optimizer_state,
    track_global_model,
)
from strategies.codec import PayloadError
from strategies.downlink import Downlink
from strategies.encoding import Encoding
from strategies.packing import PACK_KEY, can_pack, is_packed, pack_arrays, unpack_arrays
from strategies.privacy import KEY_CLIPPING_NORM, CentralDP
from strategies.privacy_budget import PrivacyBudget
from strategies.reply_checks import (
    ReplyChecks,
    check_float32_range,
    check_info,
    check_num_examples,
    non_finite_arrays,
    reply_names,
)
from strategies.sampling import SAMPLED_PARTITIONS_KEY, Sampling


def _errors_last(message: Message) -> tuple[bool, tuple[int, int]]:
    """Sort key for evaluate replies: valid ones by ``reply_order``, errors after them."""
    return message.has_error(), (0, 0) if message.has_error() else reply_order(message)


def _with_content(message: Message, content: RecordDict) -> Message:
    """A copy of a reply with other content (same sender and metadata)."""
    return make_message(metadata=message.metadata, content=content)


class FedDMStrategy:
    """Mixin for a Flower strategy: FedDM's encoding, privacy and extras, reply checks, round log.

    Parameters
    ----------
    encoding : Encoding (default: full weights)
        What travels and how replies are decoded and applied.
    downlink : Downlink (default: fp32 weights)
        The form the model travels to the clients in.
    aggregator : Aggregator (default: FedAvg's entry)
        The registry entry of the Flower class this mixin sits on (its kind: mean,
        optimizer or robust).
    privacy : CentralDP | None
        Central DP with fixed clipping, for encodings whose replies are full weights.
    privacy_budget : PrivacyBudget | None
        With ``privacy``: the epsilon its noisy means spend (``epsilon`` in the round log) and its limit.
    secure_aggregation : SecAggPlus | None
        Training rounds run Flower's SecAgg+ protocol.
    extras : sequence
        Server-side extras (``apply``, ``observe``, ``state_dict``), e.g. FedDDPM's calibration.
    evaluate_every, last_round : int
        Clients evaluate on rounds divisible by ``evaluate_every`` and on ``last_round``.
    reply_checks : ReplyChecks | None
        What the strategy trusts in a reply (weighting, num-examples bound, update norms).
    sampling : Sampling | None (default: every connected client)
        How many clients train and evaluate per round; the Flower strategy's
        ``fraction_*``/``min_*_nodes`` must match it (``Sampling.flower_options``).
    min_replies : int (default: 1)
        Fewest training replies a round aggregates; with fewer (late, failed or
        left out) the round fails with ``RoundFailedError``.
    **kwargs
        Passed to the Flower strategy.
    """

    def __init__(
        self,
        *,
        encoding: Encoding | None = None,
        downlink: Downlink | None = None,
        aggregator: Aggregator | None = None,
        privacy: CentralDP | None = None,
        privacy_budget: PrivacyBudget | None = None,
        secure_aggregation: Any = None,
        extras: Sequence[Any] = (),
        evaluate_every: int = 1,
        last_round: int = 0,
        reply_checks: ReplyChecks | None = None,
        sampling: Sampling | None = None,
        min_replies: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encoding = encoding or Encoding()
        self.downlink = downlink or Downlink()
        self.aggregator = aggregator or AGGREGATORS["fedavg"]
        self.privacy = privacy
        self.privacy_budget = privacy_budget
        self.secure_aggregation = secure_aggregation
        # fp32 arrays travel packed (strategies.packing), except where Flower's own code reads them per
        # array: fixedclipping_mod clips a reply against the message's arrays, SecAgg+ masks them.
        self.packs = secure_aggregation is None and (privacy is None or privacy.mode != "dp_client")
        self.extras = tuple(extras)
        self.reply_checks = reply_checks or ReplyChecks()
        self.sampling = sampling or Sampling()
        self.min_replies = int(min_replies)
        self.evaluate_every, self.last_round = int(evaluate_every), int(last_round)
        # Per round: numbers, and the sampled partitions (lists) when clients are sampled.
        self.round_log: dict[int, dict[str, Any]] = {}
        # Rounds done before this start (a resumed run): Flower counts from 1 again,
        # clients and logs see the true round.
        self.round_offset = 0
        self._global_arrays: ArrayRecord | None = None
        # What the round's clients start from: the global model, with what they decoded for the
        # arrays sent (int8 downlinks); replies are decoded, checked, clipped and applied against it.
        self._base_arrays: ArrayRecord | None = None
        self._secure_grid: Any = None
        self._round = 0
        self._train_started = 0.0
        self._timeout: float | None = None  # the round timeout (``start``), also for the partition query

    @property
    def personalized(self) -> bool:
        """Whether each client has a model of its own (parts kept on the clients)."""
        return self.encoding.personalized

    def layer(self, kind: type) -> Any:
        """The extra of type ``kind``, or None."""
        return next((extra for extra in self.extras if isinstance(extra, kind)), None)

    def summary(self) -> None:
        """Log the layers, then the Flower strategy's settings."""
        lines = [
            *self.encoding.summary(),
            *self.downlink.summary(),
            *(line for e in self.extras for line in e.summary()),
        ]
        for line in [*lines, *self.sampling.summary()]:
            log(INFO, "\t├──> %s", line)
        if self.privacy is not None:
            log(INFO, "\t├──> privacy: %s", self.privacy)
        if self.privacy_budget is not None:
            log(INFO, "\t├──> %s", self.privacy_budget.summary())
        if self.secure_aggregation is not None:
            log(INFO, "\t├──> privacy: %s", self.secure_aggregation)
        log(INFO, "\t├──> %s", self.reply_checks.summary())
        super().summary()

    def is_evaluation_round(self, server_round: int) -> bool:
        """Whether clients evaluate after ``server_round`` (a true round number)."""
        return server_round % self.evaluate_every == 0 or server_round == self.last_round

    def _log_round(self, server_round: int, **values: Any) -> None:
        self.round_log.setdefault(server_round, {}).update(values)

    def observe(self, server_round: int, row: dict[str, Any]) -> None:
        """The round's finished metrics row (FID included), for extras that adapt to it."""
        for extra in self.extras:
            extra.observe(server_round, row)

    # -- state kept in checkpoints -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the strategy needs to continue after the last round it ran.

        The rounds done, a server optimizer's state and each extra's state, in
        one flat dict (keys must not clash). Values are JSON values or tensors: a checkpoint keeps tensors in
        safetensors and the rest as JSON metadata; nothing is pickled.
        """
        state: dict[str, Any] = {"rounds_done": self._round, **optimizer_state(self)}
        for layer in [self.encoding, *self.extras]:
            state.update(layer.state_dict())
        if self.privacy_budget is not None:
            state.update(self.privacy_budget.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: Flower counts rounds from 1 again, clients and logs see the true round."""
        self.round_offset = int(state.get("rounds_done", 0))
        load_optimizer_state(self, state)
        for layer in [self.encoding, *self.extras]:
            layer.load_state_dict(state)
        if self.privacy_budget is not None:
            self.privacy_budget.load_state_dict(state)

    # -- the round loop ----------------------------------------------------------
    def start(self, *, grid: Grid, timeout: float = 3600, **kwargs: Any) -> Any:
        """Flower's round loop; with SecAgg+, over a grid that runs the protocol for training."""
        if self.secure_aggregation is not None:
            grid = self._secure_grid = self.secure_aggregation.wrap(grid)
        self._timeout = timeout
        return super().start(grid=grid, timeout=timeout, **kwargs)

    def _sample(
        self, phase: str, server_round: int, grid: Grid, configure: Callable[[Grid], Iterable[Message]]
    ) -> list[Message]:
        """Flower's messages of ``phase`` (``configure(grid)``); with sampling, to a seeded draw of nodes.

        The draw depends only on ``seed``, the true round and the partitions
        connected (``strategies.sampling``); the round log gets the sampled
        partitions (``sampled_partitions``, ``eval_partitions``).
        """
        if self.sampling.per_round(phase) is None:
            return list(configure(grid))
        self.sampling.learn_partitions(grid, self._timeout)
        with self.sampling.draw(phase, server_round, grid) as ordered:
            messages = list(configure(ordered))
        key = "sampled_partitions" if phase == "train" else "eval_partitions"
        self._log_round(server_round, **{key: self.sampling.partitions_of(messages)})
        return messages

    # -- training --------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model, encode it, then count what Flower's strategy sends."""
        server_round += self.round_offset
        self._round = server_round  # the true round, for hooks that run later in it
        self._train_started = time.monotonic()
        self._global_arrays = arrays
        self.encoding.train_config(config, arrays)
        for extra in self.extras:
            extra.train_config(config)
        if self.privacy is not None and self.privacy.mode == "dp_client":
            config[KEY_CLIPPING_NORM] = self.privacy.clipping_norm  # read by fixedclipping_mod
        if self.packs:
            config[PACK_KEY] = True
        prepared = self.downlink.prepare(self.encoding.downlink(arrays), server_round)
        self.downlink.configure(config, prepared)
        configure = functools.partial(super().configure_train, server_round, prepared.payload, config)
        messages = self._sample("train", server_round, grid, configure)
        if "sampled_partitions" in self.round_log.get(server_round, {}):
            # The round's partitions, for clients that split work among them (USplit groups);
            # every message holds this same config.
            config[SAMPLED_PARTITIONS_KEY] = json.dumps(self.round_log[server_round]["sampled_partitions"])
        track_global_model(self, arrays)  # a server optimizer steps from the model, not its encoding
        messages = self.downlink.address(messages, prepared, self.arrayrecord_key)
        self._base_arrays = prepared.base(arrays)
        self.downlink.commit(prepared)
        messages = self._packed(
            self.encoding.address(list(messages), self._base_arrays, self.arrayrecord_key)
        )
        self._log_round(
            server_round,
            downlink_bytes=sum(message_nbytes(m) for m in messages),
            num_sampled=len(messages),
        )
        return messages

    def accepted_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Count uplink bytes; return the valid replies with their decoded arrays."""
        replies = list(replies)
        checked, failed, rejected, reasons = [], [], 0, []
        for message in replies:
            if message.has_error():
                # Flower logs error replies itself, traceback included; keep the last line.
                reasons.append(f"node {message.metadata.src_node_id}: {last_line(message.error.reason)}")
                continue
            try:
                checked.append(self._checked(message))
            except PayloadError as err:
                failed.append((message, err))
        # Updates far larger than the round's median (once enough replies came in) are left out too.
        accepted, outliers = self.reply_checks.screen_norms(checked, self._base_arrays, self.encoding)
        for message, err in failed + outliers:
            rejected += 1
            reasons.append(f"node {message.metadata.src_node_id}: {err}")
            log(
                WARNING,
                "Round %d: left out the reply of node %d: %s",
                server_round,
                message.metadata.src_node_id,
                err,
            )
        counts = self._reply_counts(server_round, replies)
        self._log_round(
            server_round,
            uplink_bytes=sum(message_nbytes(m) for m in replies),
            num_aggregated=len(accepted),
            num_rejected=rejected,
            **counts,
        )
        accepted = self.reply_checks.weighted(sorted(accepted, key=reply_order))
        self.downlink.observe(accepted)  # only these nodes surely hold what they were sent
        if not accepted:
            raise RoundFailedError(
                f"round {server_round}: none of the {len(replies)} training replies could "
                "be aggregated, so the run stops with the last global model. "
                + ("Reasons: " + "; ".join(reasons[:4]) if reasons else "No client replied.")
                + self._late_note(counts)
            )
        if len(accepted) < self.min_replies:
            raise RoundFailedError(
                f"round {server_round}: {len(accepted)} training replies could be aggregated, fewer than "
                f"min_replies={self.min_replies}, so the run stops with the last global model "
                f"({counts['num_late']} late, {counts['num_failed']} failed, {rejected} left out)."
                + (" Reasons: " + "; ".join(reasons[:4]) if reasons else "")
                + self._late_note(counts)
            )
        return accepted

    def _reply_counts(self, server_round: int, replies: list[Message]) -> dict[str, int]:
        """``num_failed`` (error replies) and ``num_late`` (messages with no reply by the deadline).

        Flower's grids return only the replies that arrived before the timeout;
        the rest are dropped without a trace, so the late ones are the messages
        sent (``num_sampled``) less the replies.
        """
        sent = self.round_log.get(server_round, {}).get("num_sampled", len(replies))
        late = max(sent - len(replies), 0)
        if late:
            log(
                WARNING,
                "Round %d: %d of the %d training messages got no reply within %s; "
                "the round goes on without them",
                server_round,
                late,
                sent,
                self._deadline(),
            )
        return {"num_late": late, "num_failed": sum(m.has_error() for m in replies)}

    def _late_note(self, counts: dict[str, int]) -> str:
        """A hint for a failed round that lost replies to the deadline."""
        if not counts["num_late"]:
            return ""
        return (
            f" {counts['num_late']} clients sent no reply within {self._deadline()}: "
            "raise it, or draw extra clients with over_select."
        )

    def _deadline(self) -> str:
        """The round's deadline as its config key says it (unknown before ``start``, e.g. pretraining)."""
        return "round_timeout_s" + (f"={self._timeout:g}" if self._timeout is not None else "")

    def _checked(self, message: Message) -> Message:
        """The reply with its metrics checked and its arrays decoded (``PayloadError`` if not valid)."""
        metrics = check_metrics(message.content, "train_loss")
        check_info(message.content)
        check_num_examples(metrics["num-examples"], self.reply_checks.max_num_examples)
        arrays = self.encoding.decode(self._unpacked(message), self._base_arrays)
        check_float32_range(arrays)
        if self.privacy is not None:
            self.privacy.check_clipped(arrays, self._base_arrays)
        content = RecordDict({"arrays": arrays, "metrics": metrics})
        if "info" in message.content.config_records:
            content["info"] = message.content.config_records["info"]
        return _with_content(message, content)

    def _packed(self, messages: list[Message]) -> list[Message]:
        """The messages with their fp32 arrays packed (``strategies.packing``), each record packed once."""
        if not self.packs:
            return messages
        packed: dict[int, ArrayRecord] = {}
        for content in {id(m.content): m.content for m in messages}.values():
            record = content.array_records.get(self.arrayrecord_key)
            if record is not None and can_pack(record):
                if id(record) not in packed:
                    packed[id(record)] = pack_arrays(record)
                content[self.arrayrecord_key] = packed[id(record)]
        return messages

    def _unpacked(self, message: Message) -> Message:
        """The reply with its arrays unpacked, in the global model's order, if they came packed."""
        record = single_array_record(message)
        if not is_packed(record):
            return message
        content = RecordDict(dict(message.content.items()))
        (key,) = message.content.array_records.keys()
        content[key] = unpack_arrays(record, self._base_arrays.keys() if self._base_arrays else ())
        return _with_content(message, content)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check, (clip,) average, (noise,) apply: the new global model from the valid replies."""
        server_round += self.round_offset
        replies = list(replies)
        self.sampling.observe(replies)  # partitions of nodes that joined since the last draw
        accepted = self.accepted_replies(server_round, replies)
        if self._secure_grid is not None:  # the replies hold the unmasked mean; count what SecAgg+ sent
            self._log_round(server_round, **self._secure_grid.round_bytes)
        # Error replies go on to Flower, which logs them and leaves them out.
        errors = [m for m in replies if m.has_error()]
        if self.privacy is not None:  # checked replies are clipped (server-side DP), then averaged
            for message in accepted:
                message.content["arrays"] = self.privacy.clip(message.content["arrays"], self._base_arrays)
        averaged = self.encoding.average(self, server_round, errors, accepted)
        arrays, metrics = averaged or super().aggregate_train(server_round, errors + accepted)
        if arrays is None:  # e.g. Bulyan with fewer than 4f + 3 replies: Flower skips the round
            raise RoundFailedError(
                f"round {server_round}: {self.aggregator.flower_class.__name__} made no model from the "
                f"{len(accepted)} accepted replies (see its warning); the run stops with the last global model"
            )
        if self.aggregator.kind == "optimizer":
            arrays = like_global(arrays, self._global_arrays)
        if self.privacy is not None:
            arrays = self.privacy.add_noise(arrays, len(accepted))
            if self.privacy_budget is not None:  # the noisy mean is released: count it
                self._log_round(server_round, epsilon=self.privacy_budget.record_release())
        arrays = self._apply_extras(self.encoding.apply(arrays, self._base_arrays))
        self._check_finite(server_round, arrays, accepted)
        if metrics is not None:
            self._log_round(server_round, **{k: float(v) for k, v in metrics.items()})
        # Sending, client work, replies, checks and the average: the round's training phase.
        self._log_round(server_round, train_time_s=round(time.monotonic() - self._train_started, 3))
        return arrays, metrics

    def _check_finite(self, server_round: int, arrays: ArrayRecord, accepted: list[Message]) -> None:
        """``RoundFailedError`` naming the round's replies if the new global model is not finite.

        Raised from ``aggregate_train``, it stops Flower's loop before the evaluation
        callback, so the round is neither recorded nor checkpointed.
        """
        bad = non_finite_arrays(arrays)
        if bad:
            raise RoundFailedError(
                f"round {server_round}: the new global model holds NaN or inf (arrays {bad[:3]}), so the run "
                f"stops with the last good checkpoint. The average was of the replies of {reply_names(accepted)}"
            )

    def _apply_extras(self, arrays: ArrayRecord) -> ArrayRecord:
        """The new global model after each extra's turn (e.g. FedDDPM's calibration)."""
        for extra in self.extras:
            changed = extra.apply(arrays, self._round)
            if changed is not None:
                self._log_round(self._round, calibrated=1)
                arrays = changed
        return arrays

    # -- FedDDPM's round 0: every client's own model ------------------------------
    def pretrain_messages(
        self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, steps: int
    ) -> list[Message]:
        """A training message to every connected node: train your own model for ``steps`` steps."""
        config = ConfigRecord(dict(config))
        config.update({"server-round": 0, "local-steps": steps, "local-epochs": 0})
        if self.packs:
            config[PACK_KEY] = True
        messages = [
            Message(
                content=RecordDict({self.arrayrecord_key: arrays, "config": config}),
                dst_node_id=node,
                message_type="train",
            )
            for node in sorted(grid.get_node_ids())
        ]
        messages = self._packed(messages)
        self._log_round(0, downlink_bytes=sum(message_nbytes(m) for m in messages), num_sampled=len(messages))
        return messages

    def local_models(
        self, replies: list[Message], reference: ArrayRecord
    ) -> dict[int, tuple[ArrayRecord, int]]:
        """The valid uploaded local models by partition id, with their example counts.

        Checked like training replies (and counted as round 0); ``RoundFailedError``
        if none is usable.
        """
        self._global_arrays = self._base_arrays = reference
        accepted = self.accepted_replies(0, replies)
        return {
            partition_of(m): (m.content["arrays"], int(m.content["metrics"]["num-examples"]))
            for m in accepted
        }

    # -- evaluation ------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the evaluation model in the same form as the training model.

        Nothing is sent on rounds that are not evaluation rounds. The clients' view
        (``int8_delta``) stays that of the last training round, on both sides.
        """
        server_round += self.round_offset
        if not self.is_evaluation_round(server_round):
            return []
        prepared = self.downlink.prepare(self.encoding.downlink(arrays), server_round)
        config = self.encoding.evaluate_config(config, arrays)
        config = ConfigRecord({**dict(config), **prepared.config})
        configure = functools.partial(super().configure_evaluate, server_round, prepared.payload, config)
        messages = self._sample("evaluate", server_round, grid, configure)
        messages = self.downlink.address(messages, prepared, self.arrayrecord_key)
        messages = self._packed(
            self.encoding.address(list(messages), prepared.base(arrays), self.arrayrecord_key)
        )
        self._log_round(server_round, eval_downlink_bytes=sum(message_nbytes(m) for m in messages))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate client evaluation metrics and keep them in the round log."""
        server_round += self.round_offset
        replies = list(replies)
        valid = []
        for message in replies:
            if message.has_error():
                valid.append(message)
                continue
            try:
                metrics = check_metrics(message.content, "eval_loss")
                check_info(message.content)
                check_num_examples(metrics["num-examples"], self.reply_checks.max_num_examples)
                valid.append(message)
            except PayloadError as err:
                log(WARNING, "Round %d: left out an evaluate reply: %s", server_round, err)
        self.encoding.evaluate_replies(server_round, valid)
        metrics = super().aggregate_evaluate(server_round, sorted(valid, key=_errors_last))
        if metrics is not None:
            self._log_round(server_round, **{k: float(v) for k, v in metrics.items()})
        return metrics
