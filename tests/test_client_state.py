"""Client state on the node's disk (``client_state=disk``): safetensors files, the same run as in memory."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from safetensors.numpy import load_file

from client_app.downlink import VIEW_KEY
from client_app.partial import EMA_KEY, EMA_STEP_KEY, LOCAL_KEY
from client_app.state import (
    ClientStateError,
    StateRound,
    client_state,
    load_state,
    round_files,
    save_state,
    state_folder,
)
from client_app.updates import RESIDUAL_KEY
from server_app.config import compose_config, validate_config
from tests.test_sampling import _grid, _rows, _sampled_run

SECAGG_STATE = "secaggplus_state"  # not FedDM's: stays in Context.state between SecAgg+'s stages


def _context(partition: int = 3, run_id: int = 7, **node_config) -> Context:
    config = {"partition-id": partition, "num-partitions": 4, **node_config}
    return Context(run_id=run_id, node_id=11, node_config=config, state=RecordDict(), run_config={})


def _feddm_state() -> RecordDict:
    state = RecordDict()
    state[RESIDUAL_KEY] = ArrayRecord({"conv.weight": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    state[LOCAL_KEY] = ArrayRecord({"up.0.bias": Array(np.ones(4, np.float32)), "n": Array(np.int64([5]))})
    state[EMA_STEP_KEY] = ConfigRecord({"step": 3})
    return state


def _same(a: RecordDict, b: RecordDict) -> bool:
    if list(a.array_records) != list(b.array_records) or dict(a.config_records) != dict(b.config_records):
        return False
    for name, record in a.array_records.items():
        other = b.array_records[name]
        if list(record) != list(other):
            return False
        for key in record:
            x, y = record[key].numpy(), other[key].numpy()
            if x.dtype != y.dtype or not np.array_equal(x, y):
                return False
    return True


def test_state_round_trips_through_a_safetensors_file_without_pickle(tmp_path):
    path = tmp_path / "partition-3.safetensors"
    save_state(_feddm_state(), path)
    assert _same(load_state(path), _feddm_state())
    tensors = load_file(path)  # a plain safetensors file: tensors named record/array
    assert sorted(tensors) == [f"{LOCAL_KEY}/n", f"{LOCAL_KEY}/up.0.bias", f"{RESIDUAL_KEY}/conv.weight"]
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed


def test_only_feddms_records_go_to_disk(tmp_path):
    state = _feddm_state()
    state[SECAGG_STATE] = ConfigRecord({"stage": "share_keys"})
    path = tmp_path / "state.safetensors"
    save_state(state, path)
    assert SECAGG_STATE not in load_state(path)


def test_no_state_left_removes_the_file(tmp_path):
    path = tmp_path / "state.safetensors"
    save_state(_feddm_state(), path)
    save_state(RecordDict(), path)
    assert not path.exists()
    assert len(load_state(path)) == 0  # no file: a client's first turn


def test_a_damaged_or_foreign_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "state.safetensors"
    save_state(_feddm_state(), path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ClientStateError, match=r"state\.safetensors cannot be read"):
        load_state(path)
    from safetensors.numpy import save_file

    save_file({"weights/x": np.zeros(2, np.float32)}, path)
    with pytest.raises(ClientStateError, match=r"records FedDM does not keep: \['weights'\]"):
        load_state(path)
    listed = '{"feddm-quant-residual": ["w", "missing"]}'
    save_file(
        {"feddm-quant-residual/w": np.zeros(2, np.float32)}, path, metadata={"feddm-array-order": listed}
    )
    with pytest.raises(ClientStateError, match="lists other arrays than it holds"):
        load_state(path)


def test_the_folder_is_per_run_and_partition_and_the_node_config_folder_wins(tmp_path, monkeypatch):
    assert state_folder(_context(), str(tmp_path)) == tmp_path / "run-7" / "partition-3"  # Flower's run id
    assert (
        state_folder(_context(), str(tmp_path), "abc") == tmp_path / "run-abc" / "partition-3"
    )  # the server's
    node = _context(**{"client-state-dir": str(tmp_path / "node")})
    assert state_folder(node, str(tmp_path)) == tmp_path / "node" / "run-7" / "partition-3"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / "feddm" / "client_state" / "run-7" / "partition-3"
    assert state_folder(_context(), "") == expected


def test_memory_state_is_the_contexts_and_disk_state_is_saved_only_after_success(tmp_path):
    context = _context()
    with client_state(context, "memory", "", StateRound(1), save=True) as state:
        assert state is context.state
    with client_state(context, "disk", str(tmp_path), StateRound(1), save=True) as state:
        state[RESIDUAL_KEY] = _feddm_state()[RESIDUAL_KEY]
    files = round_files(state_folder(context, str(tmp_path)))
    assert RESIDUAL_KEY in load_state(files[1]) and len(context.state) == 0  # on disk, not in memory
    with pytest.raises(RuntimeError, match="training failed"):
        with client_state(context, "disk", str(tmp_path), StateRound(2), save=True) as state:
            del state[RESIDUAL_KEY]
            raise RuntimeError("training failed")
    assert sorted(round_files(state_folder(context, str(tmp_path)))) == [1]  # the last good state is kept
    with client_state(context, "disk", str(tmp_path), StateRound(2), save=False) as state:  # evaluation reads
        del state[RESIDUAL_KEY]
    assert RESIDUAL_KEY in load_state(files[1])


def _turn(context, folder, server_round: int, checkpointed: int, value: float) -> float | None:
    """One training message: the residual it found (None: none), then ``value`` kept."""
    at = StateRound(server_round, "run", checkpointed)
    with client_state(context, "disk", str(folder), at, save=True) as state:
        found = float(state[RESIDUAL_KEY]["w"].numpy()[0]) if RESIDUAL_KEY in state else None
        state[RESIDUAL_KEY] = ArrayRecord({"w": Array(np.full(2, value, np.float32))})
    return found


def test_a_message_reads_the_newest_file_before_its_round_and_keeps_what_a_resume_needs(tmp_path):
    context = _context()
    folder = state_folder(context, str(tmp_path), "run")
    assert _turn(context, tmp_path, 1, 0, 1.0) is None
    assert _turn(context, tmp_path, 3, 2, 3.0) == 1.0  # sat out round 2
    assert sorted(round_files(folder)) == [1, 3]  # round 1's file is the one a resume after round 2 needs
    assert _turn(context, tmp_path, 4, 3, 4.0) == 3.0
    assert sorted(round_files(folder)) == [3, 4]  # older than the checkpointed round's newest: gone
    at = StateRound(4, "run", 3)
    with client_state(context, "disk", str(tmp_path), at, save=False) as state:  # evaluation of round 4
        assert float(state[RESIDUAL_KEY]["w"].numpy()[0]) == 4.0


def test_a_resumed_round_ignores_and_removes_what_the_interrupted_attempt_kept(tmp_path):
    context = _context()
    folder = state_folder(context, str(tmp_path), "run")
    for server_round in (1, 2, 3):  # the run is checkpointed after round 2, then dies in round 3
        _turn(context, tmp_path, server_round, server_round - 1, float(server_round))
    assert sorted(round_files(folder)) == [2, 3]
    assert _turn(context, tmp_path, 3, 2, 33.0) == 2.0  # the resumed round 3 starts from round 2's state
    assert sorted(round_files(folder)) == [2, 3]
    assert float(load_state(round_files(folder)[3])[RESIDUAL_KEY]["w"].numpy()[0]) == 33.0


def test_a_round_that_keeps_nothing_hides_older_state(tmp_path):
    context = _context()
    _turn(context, tmp_path, 1, 0, 1.0)
    with client_state(context, "disk", str(tmp_path), StateRound(2, "run"), save=True) as state:
        del state[RESIDUAL_KEY]
    with client_state(context, "disk", str(tmp_path), StateRound(3, "run"), save=True) as state:
        assert RESIDUAL_KEY not in state


def test_client_state_is_a_checked_setting():
    validate_config(compose_config(["client_state=disk", "client_state_dir=/tmp/x"]))
    with pytest.raises(Exception, match="client_state"):
        validate_config(compose_config(["client_state=ssd"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=quant", "strategy.error_feedback=true"],
        ["strategy=partial", "strategy.preset=udec", "strategy.quantize=true"],
        ["strategy=quant", "strategy.downlink=int8_delta"],
    ],
    ids=["quant_error_feedback", "partial_udec", "quant_int8_delta"],
)
def test_a_run_with_state_on_disk_is_the_run_with_state_in_memory(
    strategy, tmp_path, flower_task_identity, data_root
):
    # 4 clients, 2 a round: some sit out rounds, so state must wait on disk for their next turn.
    overrides = ["num_rounds=4", *strategy]
    memory = _rows(_sampled_run(overrides, tmp_path / "memory", clients=4))
    # Set explicitly, even inside the run folder: kept at the end of the run.
    states = tmp_path / "disk" / "client_state"
    grid = _grid(4)
    disk = _rows(
        _sampled_run(
            [*overrides, "client_state=disk", f"client_state_dir={states}"],
            tmp_path / "disk",
            grid,
            clients=4,
        )
    )
    keys = ("round", "sampled_partitions", "train_loss", "eval_loss", "uplink_bytes")
    assert [{k: r.get(k) for k in keys} for r in disk] == [{k: r.get(k) for k in keys} for r in memory]
    assert all(len(context.state) == 0 for context in grid.contexts.values())  # nothing kept in memory
    trained = {p for r in disk for p in r.get("sampled_partitions", [])}
    run_key = (tmp_path / "disk" / "run-key").read_text().strip()
    folders = sorted((states / f"run-{run_key}").iterdir())
    assert [f.name for f in folders] == [f"partition-{p}" for p in sorted(trained)]
    files = round_files(folders[0])
    kept = load_state(files[max(files)])
    wanted = VIEW_KEY if "strategy.downlink=int8_delta" in strategy else RESIDUAL_KEY
    wanted = LOCAL_KEY if "strategy=partial" in strategy else wanted
    assert wanted in kept
    if "strategy=partial" in strategy:  # the client's own EMA too, with its step count
        assert EMA_KEY in kept and kept.config_records[EMA_STEP_KEY]["step"] >= 1
