"""Partial-UNet exchange in real 2-client Flower simulations: what leaves the clients, and evaluation."""

from __future__ import annotations

import json

import pytest

from feddm.simulation import simulate
from models import build_unet
from models.parts import PRESETS, expand, names_in
from server_app.config import compose_config
from strategies.codec import BITS_KEY, CODEC_KEYS
from tests.conftest import MICRO_OVERRIDES, REPO_ROOT
from tests.recording_client import app as recording_app

pytestmark = pytest.mark.slow

FID_WEIGHTS = REPO_ROOT.parent / "shared" / "weights" / "pt_inception-2015-12-05.torchscript.pt"


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path, monkeypatch, overrides):
    log = tmp_path / "replies.jsonl"
    monkeypatch.setenv("FEDDM_RECORD_REPLIES", str(log))
    cfg = compose_config([*MICRO_OVERRIDES, "strategy=partial", *overrides])
    run_dir = simulate(cfg, tmp_path / "run", client_app=recording_app)
    replies = [json.loads(line) for line in log.read_text().splitlines()]
    from omegaconf import OmegaConf

    unet = build_unet(OmegaConf.to_container(cfg.model.unet), image_size=28, channels=1)
    return cfg, run_dir, replies, list(unet.state_dict())


def test_udec_with_int8_keeps_local_parts_on_the_clients(tmp_path, monkeypatch, data_root):
    # The clients keep their local parts and EMA on disk (client_state=disk): in the run folder, in
    # simulation; round 2 needs round 1's local parts, and evaluation the client's own EMA.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where a SuperNode would keep them
    cfg, run_dir, replies, names = _run(
        tmp_path,
        monkeypatch,
        [
            "client_state=disk",
            "strategy.preset=udec",
            "strategy.quantize=true",
            "eval.num_samples=6",
            f"eval.fid_weights={FID_WEIGHTS}",
            f"eval.fid_cache={tmp_path / 'fid'}",
        ],
    )
    shared = set(names_in(expand(PRESETS["udec"], names), names))
    local = set(names) - shared
    assert local and shared
    train = [r for r in replies if r["kind"] == "train"]
    assert len(train) == 4  # 2 clients x 2 rounds
    for r in train:  # only shared parts, as int8 codes with their scales
        assert set(r["arrays"]) == {"arrays"}
        assert set(r["arrays"]["arrays"]) == shared
        assert set(r["entries"]["arrays"]) == set(CODEC_KEYS) - {BITS_KEY}
    for r in (r for r in replies if r["kind"] == "evaluate"):  # generated images, no weights
        assert set(r["arrays"]) == {"samples"} and r["arrays"]["samples"] == ["images"]
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:  # each client's own model: FID per client, their mean, and the pooled FID
        assert set(row["fid_clients"]) == {"0", "1"}
        assert row["fid"] == pytest.approx(sum(row["fid_clients"].values()) / 2)
        assert row["fid_mixture"] > 0 and row["num_aggregated"] == 2
    assert (run_dir / "samples" / "round_0002.png").is_file()
    assert not (run_dir / "model").exists()  # no single model: each client keeps its own
    assert not (run_dir / "client_state").exists()  # the clients' state files, removed at the end
    assert not (tmp_path / "cache" / "feddm" / "client_state").exists()  # not a SuperNode's folder
    # round 2 downlink carries only the shared parts, so it is smaller than round 1's whole model
    assert rows[1]["downlink_bytes"] < rows[0]["downlink_bytes"]


def test_usplit_pairs_send_one_model_between_them(tmp_path, monkeypatch, data_root):
    cfg, run_dir, replies, names = _run(tmp_path, monkeypatch, ["strategy.preset=usplit"])
    for round_replies in (replies[0:2], replies[4:6]):  # train replies of rounds 1 and 2
        assert [r["kind"] for r in round_replies] == ["train", "train"]
        a, b = (set(r["arrays"]["arrays"]) for r in round_replies)
        assert a.isdisjoint(b) and a | b == set(names)
    rows = _rows(run_dir)
    assert rows[0]["uplink_bytes"] < 0.6 * rows[0]["downlink_bytes"]  # one model from two clients
    assert (run_dir / "model" / "model_index.json").is_file()  # a global model, as with FedAvg
    assert "fid_clients" not in rows[-1]
