"""Resume equality beyond prox: a run stopped after round 2 and resumed ends as one that ran through.

Also server optimizers (fedavgm; fedadam with int8 updates), whose momentum
and moments are part of the strategy's state. The runs drive the real ClientApp functions through an in-process grid
(``feddm.local_grid``; no Ray start per run). Every client trains round 3 and
then fails, so the run ends with ``RoundFailedError`` and the checkpoint of round
2; the resumed run, with fresh clients as after a restart, then trains round 3
again. The strategy's own state (its round count, FedDDPM+'s progress history)
comes back through its ``state_dict()`` in the checkpoint. Client-side state
comes back with ``client_state=disk`` (quant's error-feedback residual, partial
udec's local parts and EMA): each client reads its file of round 2, not the one
its failed round 3 wrote. In memory it is lost with the clients, so those cases
run quant without error feedback and partial exchange with USplit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.numpy import load_file

from client_app.app import evaluate, train
from client_app.state import default_state_dir, round_files
from feddm.local_grid import LocalGrid
from server_app.checkpoint import load_checkpoint
from server_app.config import compose_config
from server_app.federation import run_federation
from strategies import RoundFailedError
from tests.conftest import MICRO_OVERRIDES

pytestmark = pytest.mark.slow

COMPARED = (
    "round",
    "train_loss",
    "eval_loss",
    "uplink_bytes",
    "downlink_bytes",
    "num_aggregated",
    "calibrated",
)
FEDDDPM_PLUS = [
    "strategy=fedddpm_plus",
    "strategy.pretrain_steps=2",
    "strategy.aux_samples=6",
    "strategy.aux_ddim_steps=2",
    "strategy.calibration_steps=2",
    "strategy.calibration_batch_size=4",
    "strategy.signal=train_loss",
    "strategy.window=1",
    "strategy.threshold=0.9",
]
CASES = {
    "quant": ["strategy=quant", "strategy.error_feedback=false", "strategy.stochastic_rounding=true"],
    "fedddpm_plus": FEDDDPM_PLUS,
    "partial_usplit": ["strategy=partial", "strategy.preset=usplit", "strategy.quantize=true"],
    # server optimizers: momentum and moments come back from the checkpoint
    "fedavgm": ["aggregator=fedavgm", "aggregator.server_momentum=0.9"],
    "fedadam_quant": ["strategy=quant", "strategy.error_feedback=false", "aggregator=fedadam"],
    # client-side state on disk: the residual, the local parts and the client's EMA come back
    "quant_error_feedback_disk": ["strategy=quant", "strategy.error_feedback=true", "client_state=disk"],
    "partial_udec_disk": [
        "strategy=partial",
        "strategy.preset=udec",
        "strategy.quantize=true",
        "client_state=disk",
    ],
}


def _run(cfg, run_dir, fail_from_round: int | None = None, clients: int = 2):
    """``run_federation`` with in-process clients; from ``fail_from_round`` on, their training raises."""

    def client(msg, context):
        if msg.metadata.message_type == "evaluate":
            return evaluate(msg, context)
        reply = train(msg, context)  # trains (and keeps its state) even in the round that fails
        if fail_from_round is not None and int(msg.content["config"]["server-round"]) >= fail_from_round:
            raise RuntimeError("injected failure")
        return reply

    grid = LocalGrid(range(1, clients + 1), client)
    for partition, context in enumerate(grid.contexts.values()):
        context.node_config.update({"partition-id": partition, "num-partitions": clients})
    return run_federation(grid, cfg, run_dir)


def _rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r.get(k) for k in COMPARED} for r in map(json.loads, lines)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_stopped_after_round_2_and_resumed_equals_uninterrupted(
    case, tmp_path, flower_task_identity, data_root
):
    overrides = [*MICRO_OVERRIDES, "num_rounds=3", *CASES[case]]
    through = _run(compose_config(overrides), tmp_path / "through")

    stopped = tmp_path / "stopped"
    with pytest.raises(RoundFailedError, match="injected failure"):
        _run(compose_config(overrides), stopped, fail_from_round=3)
    checkpoint, _ = load_checkpoint(stopped)
    assert checkpoint.round == 2 and checkpoint.strategy_state["rounds_done"] == 2
    if "client_state=disk" in overrides:  # each client wrote round 3's file, which the resume must not use
        run_key = (stopped / "run-key").read_text().strip()
        folders = sorted((Path(default_state_dir()) / f"run-{run_key}").iterdir())
        assert [sorted(round_files(f)) for f in folders] == [[2, 3], [2, 3]]
    if case == "fedddpm_plus":  # the progress signal since the last calibration, in the checkpoint
        assert isinstance(checkpoint.strategy_state["history"], list)
    if case.startswith("fed"):  # a server optimizer's state is in the checkpoint as tensors
        moments = [k for k in checkpoint.strategy_state if k.startswith("aggregator.")]
        assert (len(moments) > 0) == (case != "fedddpm_plus")

    resumed = _run(compose_config([f"resume={stopped}"]), None)
    assert resumed == stopped.resolve()
    assert _rows(resumed) == _rows(through)
    if case == "fedddpm_plus":  # round 3 calibrates only if the history of rounds 1-2 came back
        assert _rows(through)[-1]["calibrated"] == 1
    if "client_state=disk" in overrides:  # what each client keeps after round 3, to the bit
        assert _client_states(through, 3) == _client_states(resumed, 3)
    if "strategy.preset=udec" in overrides:
        return  # each client keeps its own model: no global one in the run folder
    w_through = UNet2DModel.from_pretrained(through / "model" / "unet").state_dict()
    w_resumed = UNet2DModel.from_pretrained(resumed / "model" / "unet").state_dict()
    assert all(torch.equal(w_through[n], w_resumed[n]) for n in w_through)


def _client_states(run_dir: Path, server_round: int) -> list[dict[str, bytes]]:
    """Each partition's state file of ``server_round``, as raw tensor bytes by name."""
    run_key = (run_dir / "run-key").read_text().strip()
    folders = sorted((Path(default_state_dir()) / f"run-{run_key}").iterdir())
    files = [load_file(round_files(folder)[server_round]) for folder in folders]
    return [{name: array.tobytes() for name, array in tensors.items()} for tensors in files]
