"""Checkpoints: round trip, RNG states, damaged files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from server_app.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _checkpoint():
    return Checkpoint(
        round=3,
        global_weights={"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)},
        ema_weights={"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)},
        ema_step=3,
        strategy_state={"name": "quant"},
    )


def test_strategy_state_keeps_json_values_and_tensors_apart(tmp_path):
    from safetensors import safe_open

    from strategies import StallCalibration, build_strategy

    fedddpm_plus = {
        "name": "fedddpm_plus",
        "pretrain_steps": 1,
        "aux_samples": 4,
        "aux_allocation": "balanced",
    }
    fedddpm_plus |= {"signal": "train_loss", "window": 2, "threshold": 0.02}
    strategy = build_strategy(fedddpm_plus, num_clients=1)
    strategy._round, strategy.layer(StallCalibration).history = 4, [0.5, 0.25]
    state = {**strategy.state_dict(), "name": "fedddpm_plus", "momentum.conv.weight": torch.randn(2, 3)}
    save_checkpoint(tmp_path, Checkpoint(round=4, global_weights={"w": torch.zeros(1)}, strategy_state=state))
    with safe_open(
        str(tmp_path / CHECKPOINT_NAME), framework="pt"
    ) as file:  # tensors as tensors, never pickled
        assert "strategy/momentum.conv.weight" in file.keys()
        assert "momentum" not in file.metadata()["strategy_state"]
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.strategy_state.keys() == state.keys()
    assert torch.equal(loaded.strategy_state["momentum.conv.weight"], state["momentum.conv.weight"])
    restored = build_strategy(fedddpm_plus, num_clients=1)
    restored.load_state_dict(loaded.strategy_state)
    assert restored.round_offset == 4 and restored.layer(StallCalibration).history == [0.5, 0.25]


def test_round_trip_and_rng_states(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = _checkpoint()
    save_checkpoint(tmp_path, saved)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)

    loaded, torch_rng = load_checkpoint(tmp_path)
    assert loaded.round == 3 and loaded.ema_step == 3
    assert loaded.strategy_state == {"name": "quant"}
    for name, tensor in saved.global_weights.items():
        assert torch.equal(loaded.global_weights[name], tensor)
        assert torch.equal(loaded.ema_weights[name], saved.ema_weights[name])
    restore_rng_state(loaded.rng_state, torch_rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_raises_a_clear_error(tmp_path, damage):
    save_checkpoint(tmp_path, _checkpoint())
    path = tmp_path / CHECKPOINT_NAME
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64 + data[64:])
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        load_checkpoint(tmp_path)


def test_a_new_checkpoint_replaces_the_old_one(tmp_path):
    save_checkpoint(tmp_path, _checkpoint())
    later = _checkpoint()
    later.round = 4
    save_checkpoint(tmp_path, later)
    assert load_checkpoint(tmp_path)[0].round == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_only_a_run_folder_without_trained_rounds_restarts_on_resume(tmp_path):
    import json

    from server_app.federation import trained_nothing

    run = tmp_path / "run"
    assert not trained_nothing(run)  # no run folder at all
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    assert trained_nothing(run)  # stopped before any metrics
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "phase": "pretrain"}) + "\n")
    assert trained_nothing(run)  # only FedDDPM's pretraining
    (run / "model").mkdir()
    assert not trained_nothing(run)  # a finished run (checkpoint_every=0)
    (run / "model").rmdir()
    with (run / "metrics.jsonl").open("a") as rows:
        rows.write(json.dumps({"round": 1}) + "\n")
    assert not trained_nothing(run)  # a trained round: resume needs its checkpoint
    (run / "metrics.jsonl").write_text("")
    save_checkpoint(run, _checkpoint())
    assert not trained_nothing(run)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """Fails if the checkpoint is written in place: the crash would cut the previous one short."""
    import server_app.checkpoint as checkpoint_module

    previous = _checkpoint()
    save_checkpoint(tmp_path, previous)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    real_save_file = checkpoint_module.save_file

    def crash_halfway(tensors, filename, metadata=None):
        """Write the new file's first half where asked, then fail as a full disk or a kill would."""
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as file:
            file.truncate(len(file.read()) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", crash_halfway)
    later = _checkpoint()
    later.round = 4
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, later)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    restored, _ = load_checkpoint(tmp_path)
    assert restored.round == 3
    assert all(torch.equal(restored.global_weights[k], v) for k, v in previous.global_weights.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no half file left


def test_a_checkpoint_is_flushed_before_and_after_its_rename(tmp_path, monkeypatch):
    """fsync of the new file's data before the rename, of the folder's entry after it."""
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the synced files")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = save_checkpoint(tmp_path, _checkpoint())
    folder = str(tmp_path.resolve())
    assert events == [
        ("fsync", str(path.resolve()) + ".tmp"),
        ("replace", str(path)),
        ("fsync", folder),
    ]
