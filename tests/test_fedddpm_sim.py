"""FedDDPM+ in a real 2-client Flower simulation: pretraining upload, auxiliary data, one-shot calibration."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from feddm.simulation import simulate
from server_app.config import compose_config
from tests.conftest import MICRO_OVERRIDES

pytestmark = pytest.mark.slow

FAST_FEDDDPM = [
    "strategy.pretrain_steps=2",
    "strategy.aux_samples=6",
    "strategy.aux_allocation=weighted",
    "strategy.aux_ddim_steps=2",
    "strategy.calibration_steps=2",
    "strategy.calibration_batch_size=4",
]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fedddpm_plus_uploads_local_models_once_and_calibrates_when_progress_stalls(
    tmp_path, data_root, caplog
):
    # train_loss always "stalls" against a 100% threshold: the first check that has a full
    # window (round 3, after rounds 1 and 2 were observed) fires, then a new window starts.
    cfg = compose_config(
        [
            *MICRO_OVERRIDES,
            "num_rounds=4",
            "strategy=fedddpm_plus",
            *FAST_FEDDDPM,
            "strategy.signal=train_loss",
            "strategy.window=1",
            "strategy.threshold=1.0",
        ]
    )
    with caplog.at_level("INFO"):
        run_dir = simulate(cfg, tmp_path / "run")
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    pretrain = rows[0]
    assert pretrain["phase"] == "pretrain" and pretrain["num_aggregated"] == 2 and pretrain["aux_images"] == 6
    # the upload of the two local models is counted: two whole models, as in a FedAvg round
    assert pretrain["uplink_bytes"] == rows[1]["uplink_bytes"]
    assert [r.get("calibrated", 0) for r in rows[1:]] == [0, 0, 1, 0]
    assert "one-shot calibration after round 3" in caplog.text
    aux = load_file(str(run_dir / "auxiliary.safetensors"))["images"]
    assert tuple(aux.shape) == (6, 1, 28, 28) and str(aux.dtype) == "torch.uint8"
    assert (run_dir / "model" / "model_index.json").is_file()


def test_fedddpm_resumes_after_pretraining_reuses_its_auxiliary_data_and_calibrates_every_round(
    tmp_path, data_root, monkeypatch, caplog
):
    from strategies import RoundFailedError
    from tests.faulty_client import app as faulty_app

    run = tmp_path / "run"
    cfg = compose_config([*MICRO_OVERRIDES, "strategy=fedddpm", *FAST_FEDDDPM])
    monkeypatch.setenv("FEDDM_FAULT", "raise-all")  # every client fails in round 1, after pretraining
    monkeypatch.setenv("FEDDM_FAULT_ROUND", "1")
    with pytest.raises(RoundFailedError):
        simulate(cfg, run, client_app=faulty_app)
    assert [r["round"] for r in _rows(run)] == [0] and not (run / "checkpoint.safetensors").exists()
    aux = (run / "auxiliary.safetensors").read_bytes()
    # No checkpoint yet: resuming trains from round 1, with the auxiliary images of the
    # first attempt (no second pretraining, one pretraining row).
    caplog.clear()
    with caplog.at_level("INFO"):
        rows = _rows(simulate(compose_config([*MICRO_OVERRIDES, f"resume={run}"]), run))
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[0]["phase"] == "pretrain"
    assert "trains its own model" not in caplog.text and "6 auxiliary images from" in caplog.text
    assert (run / "auxiliary.safetensors").read_bytes() == aux
    assert [r["calibrated"] for r in rows[1:]] == [1, 1]
