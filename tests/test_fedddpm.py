"""FedDDPM and FedDDPM+: pretraining messages, auxiliary allocation, calibration and its trigger."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from models import build_scheduler
from server_app.auxiliary import server_calibration
from strategies import Calibration, RoundFailedError, StallCalibration, build_strategy
from strategies.codec import payload_nbytes
from strategies.packing import PACK_KEY, is_packed, pack_arrays
from tests.conftest import reply
from tests.test_partial import _unet
from tests.test_strategies import FakeGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")

FEDDDPM = {"name": "fedddpm", "pretrain_steps": 7, "aux_samples": 10, "aux_allocation": "balanced"}


def test_pretraining_asks_every_node_to_train_its_own_model():
    strategy = build_strategy(FEDDDPM, num_clients=2)
    arrays = ArrayRecord(_unet().state_dict())
    steps = strategy.layer(Calibration).pretrain_steps
    messages = strategy.pretrain_messages(
        arrays, ConfigRecord({"lr": 0.1, "local-steps": 50}), FakeGrid([5, 3]), steps
    )
    assert [m.metadata.dst_node_id for m in messages] == [3, 5]
    config = messages[0].content["config"]
    assert config["local-steps"] == 7 and config["server-round"] == 0 and config["lr"] == 0.1
    assert strategy.round_log[0]["downlink_bytes"] == 2 * payload_nbytes(pack_arrays(arrays))  # packed fp32
    assert config[PACK_KEY] is True and all(is_packed(m.content["arrays"]) for m in messages)


def _upload(arrays, node_id, partition_id, num_examples):
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"train_loss": 0.3, "num-examples": num_examples}),
            "info": ConfigRecord({"partition-id": partition_id}),
        }
    )
    return reply(content, node_id)


def test_uploaded_local_models_are_checked():
    strategy = build_strategy(FEDDDPM, num_clients=2)
    state = _unet().state_dict()
    good = _upload(ArrayRecord(state), 1, 1, 30)
    nan = _upload(ArrayRecord({k: v * float("nan") for k, v in state.items()}), 2, 0, 10)
    models = strategy.local_models([nan, good], ArrayRecord(state))
    assert list(models) == [1] and models[1][1] == 30
    assert strategy.round_log[0]["num_rejected"] == 1
    assert strategy.round_log[0]["uplink_bytes"] > payload_nbytes(ArrayRecord(state))
    with pytest.raises(RoundFailedError, match="round 0: none of the 1 training replies"):
        strategy.local_models([nan], ArrayRecord(state))


@pytest.mark.parametrize(
    ("allocation", "expected"), [("balanced", {0: 4, 1: 3, 2: 3}), ("weighted", {0: 1, 1: 2, 2: 7})]
)
def test_auxiliary_images_are_allocated_balanced_or_by_examples(allocation, expected):
    strategy = Calibration(aux_samples=10, aux_allocation=allocation)
    counts = strategy.allocation({0: 100, 1: 200, 2: 700})
    assert sum(counts.values()) == 10
    assert counts == expected if allocation == "weighted" else sorted(counts.values()) == [3, 3, 4]


def test_fedddpm_calibrates_after_every_aggregation():
    strategy = build_strategy(FEDDDPM, num_clients=1)
    calls = []
    strategy.layer(Calibration).calibrate = lambda arrays, rnd: calls.append(rnd) or arrays
    state = _unet().state_dict()
    for rnd in (1, 2):
        strategy.configure_train(rnd, ArrayRecord(state), ConfigRecord(), FakeGrid([1]))
        strategy.aggregate_train(rnd, [_upload(ArrayRecord(state), 1, 0, 5)])
    assert calls == [1, 2] and strategy.round_log[2]["calibrated"] == 1


def test_fedddpm_plus_fires_once_per_stall():
    strategy = StallCalibration(signal="eval_loss", window=2, threshold=0.05)
    decisions = []
    for rnd, loss in enumerate([1.0, 0.8, 0.6, 0.59, 0.585, 0.58, 0.579, 0.4], start=1):
        decisions.append(strategy.should_calibrate(rnd))
        strategy.observe(rnd, {"eval_loss": loss})
    # improvement over 2 observations: r4 sees 1.0 -> 0.6 (40%): no; r5 sees 0.8 -> 0.59 (26%): no;
    # r6 sees 0.6 -> 0.585 (2.5% < 5%): fire, and wait for a full new window (3 observations)
    assert decisions == [False, False, False, False, False, True, False, False]
    strategy.observe(9, {"eval_loss": 0.578})
    assert strategy.should_calibrate(9)  # 0.58 -> 0.578 after the new window: fires again
    strategy.observe(10, {"train_loss": 0.1})  # rounds without the signal are skipped
    assert strategy.history == []


def test_server_calibration_trains_on_the_auxiliary_images_reproducibly():
    unet = _unet()
    scheduler = build_scheduler({"num_train_timesteps": 100})
    images = torch.randint(
        0, 256, (16, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    calibrate = server_calibration(
        dict(unet.config),
        scheduler,
        images,
        steps=3,
        lr=1e-3,
        batch_size=4,
        seed=0,
        device=torch.device("cpu"),
    )
    before = ArrayRecord(unet.state_dict())
    once, again, other = calibrate(before, 1), calibrate(before, 1), calibrate(before, 2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(once.to_torch_state_dict().values(), again.to_torch_state_dict().values())
    )
    changed = [k for k, v in once.to_torch_state_dict().items() if not torch.equal(v, unet.state_dict()[k])]
    assert len(changed) > 0.9 * len(unet.state_dict())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(once.to_torch_state_dict().values(), other.to_torch_state_dict().values())
    )


def test_fedddpm_strategy_rejects_bad_settings():
    with pytest.raises(ValueError, match="aux_allocation"):
        Calibration(aux_allocation="random")
    with pytest.raises(ValueError, match="signal"):
        StallCalibration(signal="accuracy")
    assert isinstance(
        build_strategy(
            FEDDDPM | {"name": "fedddpm_plus", "signal": "fid", "window": 2, "threshold": 0.0}, num_clients=1
        ).layer(Calibration),
        StallCalibration,
    )


def test_fedddpm_plus_rebuilds_its_history_from_a_resumed_runs_rows():
    live = StallCalibration(signal="train_loss", window=1, threshold=0.5)
    rows = []
    for rnd, loss in enumerate([1.0, 0.9, 0.8, 0.3, 0.29], start=1):
        row = {"round": rnd, "train_loss": loss}
        if live.should_calibrate(rnd):
            row["calibrated"] = 1
        live.observe(rnd, row)
        rows.append(row)
    assert [r.get("calibrated", 0) for r in rows] == [0, 0, 1, 0, 0]
    resumed = StallCalibration(signal="train_loss", window=1, threshold=0.5)
    for row in rows:
        resumed.observe(row["round"], row)
    assert resumed.history == live.history
