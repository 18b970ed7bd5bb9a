"""The benchmarks' run plans compose into valid configs (their results are measured, not tested)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import quality, scale
from server_app.config import compose_config, validate_config


@pytest.mark.parametrize("scale", ["quick", "full"])
def test_every_quality_run_is_a_valid_config(scale, tmp_path):
    settings = quality.SCALES[scale]
    runs = quality.plan(settings)
    names = [r.name for r in runs]
    assert "centralized" in names and "vanilla_iid" in names and "quant_dirichlet-0.1" in names
    assert {"udec+int8_dirichlet-0.1", "usplit4+int8_dirichlet-0.1", "fedddpm_plus_dirichlet-0.1"} <= set(
        names
    )
    totals = set()
    for run in runs:
        overrides = quality.run_overrides(run, settings, Path("/data"), None, tmp_path)
        cfg = compose_config(overrides)
        validate_config(cfg)
        totals.add(cfg.num_clients * cfg.local_steps * cfg.num_rounds)
        if run.method in quality.PERSONALIZED:  # a share of the FID images from each client
            assert cfg.eval.num_samples * cfg.num_clients == settings["num_samples"]
    assert len(totals) == 1  # equal total training steps for every method


def test_the_aggregators_suite_sweeps_under_iid_and_runs_the_chosen_settings_everywhere(tmp_path):
    settings = quality.SCALES["quick"]
    runs = quality.plan(settings, suite="aggregators")
    by_partition = {p: {r.method for r in runs if r.partition == p} for p in quality.PARTITIONS}
    sweep = {quality._fedavgm(*s) for s in quality.FEDAVGM_SWEEP} | {
        quality._fedadam(e) for e in quality.FEDADAM_SWEEP
    }
    assert sweep | {"vanilla"} <= by_partition["iid"]
    chosen = {quality._fedavgm(*quality.TUNED_FEDAVGM), quality._fedadam(quality.TUNED_FEDADAM)}
    assert by_partition["dirichlet-0.1"] == {"vanilla"} | chosen | {m + " +int8" for m in chosen}
    totals = set()
    for run in runs:
        cfg = compose_config(quality.run_overrides(run, settings, Path("/data"), None, tmp_path))
        validate_config(cfg)
        totals.add(cfg.num_clients * cfg.local_steps * cfg.num_rounds)
        if run.method.startswith("fedadam"):
            assert cfg.aggregator.name == "fedadam" and f"eta={cfg.aggregator.eta:g}" in run.method
        assert (cfg.strategy.name == "quant") == run.method.endswith("+int8")
    assert len(totals) == 1


def test_the_aggregator_target_reads_the_best_server_optimizer_of_each_partition():
    def run(method, partition, fid):
        return {"method": method, "partition": partition, "final_fid": fid}

    results = {
        "centralized": run("centralized", "-", 100.0),
        "vanilla_iid": run("vanilla", "iid", 150.0),
        "vanilla_dirichlet-0.1": run("vanilla", "dirichlet-0.1", 160.0),
        "a": run("fedadam eta=0.01", "iid", 112.0),
        "b": run("fedavgm lr=1 m=0.9", "iid", 130.0),
        "c": run("fedadam eta=0.01", "dirichlet-0.1", 170.0),
        "d": run("fedavgm lr=1 m=0.9", "dirichlet-0.1", 155.0),
    }
    text = quality.aggregator_target(results)
    assert "IID: met (best: fedadam eta=0.01, 1.12x)" in text
    assert "Dirichlet 0.1: met (best: fedavgm lr=1 m=0.9, FID 155.0 vs 160.0)" in text
    results["d"]["final_fid"] = 161.0
    assert "Dirichlet 0.1: missed" in quality.aggregator_target(results)
    del results["c"], results["d"]
    assert quality.aggregator_target(results).startswith("not measured")


def test_only_names_unknown_runs():
    with pytest.raises(SystemExit, match="vanila_iid"):
        quality.plan(quality.SCALES["quick"], ["vanila_iid"])


def _compression_run(method, partition, fid, up, down, machine="m1"):
    return {
        "method": method,
        "partition": partition,
        "final_fid": fid,
        "total_uplink_bytes": up,
        "total_downlink_bytes": down,
        "machine": machine,
    }


def test_the_compression_notes_read_the_three_targets_per_partition():
    results = {
        "vanilla_iid": _compression_run("vanilla", "iid", 200.0, 8000, 8000),
        "int4_iid": _compression_run("int4", "iid", 204.0, 1000, 8000),
        "usplit4+int4_iid": _compression_run("usplit4+int4", "iid", 219.0, 250, 8000),
        "int4+int8_delta_iid": _compression_run("int4+int8_delta", "iid", 202.0, 1000, 2000),
        "vanilla_dirichlet-0.1": _compression_run("vanilla", "dirichlet-0.1", 200.0, 8000, 8000),
        "int4_dirichlet-0.1": _compression_run("int4", "dirichlet-0.1", 220.0, 1000, 8000),
        "int4+int8_delta_dirichlet-0.1": _compression_run(
            "int4+int8_delta", "dirichlet-0.1", 200.0, 1000, 2100
        ),
    }
    text = quality.compression_notes(results)
    assert "met: int4 (iid: 8.000x, FID 1.020x)" in text
    assert "missed: int4 (dirichlet-0.1: 8.000x, FID 1.100x)" in text
    assert "met by usplit4+int4 (iid: 32.000x, FID 1.095x)" in text
    assert "met: int4+int8_delta (iid: downlink 4.00x" in text
    assert "missed: int4+int8_delta (dirichlet-0.1: downlink 3.81x" in text
    del results["usplit4+int4_iid"], results["int4+int8_delta_iid"], results["int4+int8_delta_dirichlet-0.1"]
    text = quality.compression_notes(results)
    assert "not met by any configuration" in text and "int8_delta: not measured yet" in text


def test_the_notes_say_which_machine_ran_which_run_only_when_there_are_several():
    results = {
        "vanilla_iid": _compression_run("vanilla", "iid", 200.0, 8000, 8000, "Xeon"),
        "int4_iid": _compression_run("int4", "iid", 204.0, 1000, 8000, "Xeon"),
    }
    assert quality.machine_notes(results) == ""
    results["vanilla_dirichlet-0.1"] = _compression_run("vanilla", "dirichlet-0.1", 200.0, 8000, 8000, "EPYC")
    text = quality.machine_notes(results)
    assert "Xeon: vanilla_iid, int4_iid; EPYC: vanilla_dirichlet-0.1" in text
    assert "vanilla_iid on Xeon, vanilla_dirichlet-0.1 on EPYC" in text


def test_earlier_runs_are_kept_with_their_fields_and_the_machine_that_wrote_them(tmp_path, monkeypatch):
    scale = dict(quality.SCALES["quick"])
    old = _compression_run("int4", "iid", 204.0, 1000, 8000)
    del old["machine"]
    old["extra"] = [1, 2]
    replaced = _compression_run("vanilla", "iid", 1.0, 1, 1, "old")
    payload = {
        "machine": {"cpu": "Xeon"},
        "results": {"settings": scale, "runs": {"int4_iid": old, "vanilla_iid": replaced}},
    }
    (tmp_path / "q.json").write_text(json.dumps(payload))
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    new = {"vanilla_iid": _compression_run("vanilla", "iid", 200.0, 8000, 8000, "EPYC")}
    merged = quality.merged_with_earlier("q", scale, new, "compression")
    assert list(merged) == ["vanilla_iid", "int4_iid"]  # the suite's order
    assert merged["vanilla_iid"]["machine"] == "EPYC" and merged["vanilla_iid"]["final_fid"] == 200.0
    assert merged["int4_iid"] == {**old, "machine": "Xeon"}
    other = dict(scale, eval_every=4 if scale["eval_every"] != 4 else 8)  # another scale: replaced
    assert quality.merged_with_earlier("q", other, new, "compression") == new


def test_pareto_frontier_keeps_the_points_nothing_beats():
    points = [(10, 200), (1, 250), (5, 190), (2, 260)]
    assert quality.pareto_frontier(points) == [(1, 250), (5, 190)]


def test_the_tree_sampler_finds_a_grandchild_and_stops_the_whole_tree():
    # `; true` keeps sh from exec'ing sleep: sleep is the child of the shell, a grandchild here.
    shell = subprocess.Popen(["sh", "-c", "sleep 30; true"], start_new_session=True)
    sampler = scale.TreeMemorySampler(shell.pid)
    try:
        deadline = time.monotonic() + 10
        sleepers: list[int] = []
        while not sleepers and time.monotonic() < deadline:
            sampler.sample_once()
            table = scale.process_table()
            sleepers = [pid for pid in sampler.seen if table.get(pid) and table[pid].ppid == shell.pid]
            time.sleep(0.05)
        assert sleepers and shell.pid in sampler.seen
        assert sampler.peak_processes >= 2 and sampler.peak_pss_kib > 0
        assert sampler.peak_rss_kib >= sampler.peak_pss_kib
        report = sampler.report()
        assert report["peak_pss_gib"] > 0 and report["largest_at_peak_pss_mib"]
    finally:
        scale.stop_run(shell, sampler.seen, timeout_s=5)
    assert shell.poll() is not None
    assert not any(scale._same_process(pid, start) for pid, start in sampler.seen.items())


def test_tree_pids_follows_parents_and_the_session():
    info = scale.ProcInfo
    table = {
        1: info("S", 0, 1, 0),
        10: info("S", 1, 10, 5),  # the run, leading its session
        11: info("S", 10, 10, 6),
        12: info("S", 11, 10, 7),  # a grandchild
        13: info("S", 1, 10, 8),  # reparented to init, still in the run's session
        20: info("S", 1, 20, 9),  # someone else's
    }
    assert scale.tree_pids(10, table) == {10, 11, 12, 13}
    assert scale.tree_pids(99, table) == set()


def test_round_timings_read_flowers_round_lines():
    lines = [
        (1.0, "\x1b[92mINFO \x1b[0m:      FedDM run folder: /x"),
        (20.0, "\x1b[92mINFO \x1b[0m:      [ROUND 1/3]"),
        (26.5, "INFO :      Sampling: 1000 nodes reported their partition id"),
        (50.0, "INFO :      [ROUND 2/3]"),
        (60.0, "INFO :      [ROUND 3/3]"),
        (74.0, "INFO :      Strategy execution finished in 54.00s"),
        (80.0, "FedDM run folder: /x"),
    ]
    timings = scale.round_timings(lines)
    assert timings["startup_s"] == 20.0
    assert timings["round_s"] == [30.0, 10.0, 14.0]
    assert timings["first_round_s"] == 30.0 and timings["later_rounds_mean_s"] == 12.0
    assert timings["partition_query_s"] == 6.5
    unfinished = scale.round_timings(lines[:4])  # the run died in round 2
    assert unfinished["round_s"] == [30.0] and unfinished["later_rounds_mean_s"] is None
    assert scale.round_timings([])["startup_s"] is None


def test_round_ratios_compare_later_rounds_with_the_smallest_population():
    runs = {
        "vanilla_10": {"later_rounds_mean_s": 10.0},
        "vanilla_1000": {"later_rounds_mean_s": 13.0},
        "quant_10": {"later_rounds_mean_s": None},
    }
    ratios = scale.round_ratios(runs, [10, 1000], ["vanilla", "quant"])
    assert ratios["vanilla"] == {"10": 1.0, "1000": 1.3}
    assert ratios["quant"] == {"10": None, "1000": None}


@pytest.mark.parametrize("strategy", list(scale.STRATEGIES))
def test_every_scale_run_is_a_valid_config(strategy, tmp_path):
    settings = scale.SCALES["quick"]
    overrides = scale.scale_overrides(1000, strategy, settings, Path("/data"), tmp_path / "run", 5, "memory")
    hydra = [o for o in overrides if o.startswith("hydra.")]
    assert hydra == [f"hydra.run.dir={tmp_path / 'run'}"]
    cfg = compose_config([o for o in overrides if o not in hydra])
    validate_config(cfg)
    assert (cfg.num_clients, cfg.clients_per_round, cfg.partition.min_partition_size) == (1000, 10, 5)
    assert cfg.eval.num_samples == 0 and cfg.num_rounds == settings["rounds"]
    assert not any(o.startswith("client_state") for o in overrides)  # memory: the key is not sent
    disk = scale.scale_overrides(10, strategy, settings, Path("/data"), tmp_path / "run", 10, "disk")
    assert "client_state=disk" in disk


def test_state_files_are_found_and_measured(tmp_path):
    from safetensors.numpy import save_file

    first, second = tmp_path / "run-123" / "partition-0", tmp_path / "run-123" / "partition-1"
    first.mkdir(parents=True), second.mkdir()
    save_file({"a": np.zeros(1, np.float32)}, first / "round-1.safetensors")  # older: not counted
    save_file(
        {"a": np.zeros((4, 8), np.float32), "b": np.zeros(3, np.float32)}, first / "round-2.safetensors"
    )
    save_file({"a": np.zeros((4, 8), np.float32)}, second / "round-1.safetensors")
    (tmp_path / "run-123" / "other.txt").write_text("not state")
    paths = scale.client_state_files(tmp_path)
    assert [(p.parent.name, p.name) for p in paths] == [
        ("partition-0", "round-2.safetensors"),
        ("partition-1", "round-1.safetensors"),
    ]
    cost = scale.describe_state_files(paths)
    assert cost["clients_with_state"] == 2 and cost["mean_tensors"] == 1.5 and cost["mean_values"] == 33.5
    assert cost["mean_bytes"] == sum(p.stat().st_size for p in paths) / 2
    assert cost["projected_gib_1000_clients"] == pytest.approx(cost["mean_bytes"] * 1000 / 2**30)


def test_train_throughputs_plain_loop_trains_and_the_report_says_no_gpu_figures_were_estimated():
    import torch

    from benchmarks import train_throughput
    from models.precision import FP32
    from tests.test_precision import _micro_setup

    unet, scheduler, _ = _micro_setup()
    before = [p.detach().clone() for p in unet.parameters()]
    images = torch.rand(8, 1, 28, 28) * 2 - 1
    loss = train_throughput.plain_diffusers_loop(
        unet, scheduler, images, steps=3, batch_size=4, lr=1e-3, precision=FP32, channels_last=True
    )
    assert np.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, unet.parameters()))
    assert all(p.is_contiguous() for p in unet.parameters())  # back to the default layout
    ratios = {
        "feddm fp32": 2.0,
        "plain fp32": 2.0,
        "feddm bf16": 3.0,
        "plain bf16": 3.0,
        "feddm bf16 + compile": 3.0,
    }
    result = {
        "batch_size": 4,
        "steps": 3,
        "repeats": 1,
        "images_per_s": ratios,
        "warmup_s": dict.fromkeys(ratios, 1.0),
        "ratio_feddm_vs_plain_fp32": 1.0,
        "ratio_feddm_vs_plain_bf16": 1.0,
        "ratio_bf16_vs_fp32": 1.5,
        "ratio_compile_vs_bf16": 1.0,
    }
    _, cpu_notes = train_throughput.report({"tiny": result}, torch.device("cpu"))
    assert "no GPU was lent" in cpu_notes
    _, gpu_notes = train_throughput.report({"tiny": result}, torch.device("cuda"))
    assert "feddm >= 0.95x plain: met" in gpu_notes and "bf16 >= 1.8x fp32: missed" in gpu_notes


def _supernode_log(start: float, rounds: int) -> str:
    """A SuperNode log as Flower 1.42 writes it with FLWR_LOG_LEVEL=DEBUG: a train message per round, 10 s apart."""
    events = [
        (0.0, "INFO", "Receiving: train message (ID: abc)"),
        (1.0, "INFO", "Start `flwr-clientapp` process"),
        (2.0, "INFO", "Received successfully"),
        (2.5, "DEBUG", "[flwr-clientapp] Start FAB installation."),
        (2.6, "DEBUG", "[flwr-clientapp] Start `ClientApp` Loading."),
        (7.6, "DEBUG", "FedDM train: model and data 0.500 s, local training 1.000 s, reply 0.100 s"),
        (7.7, "DEBUG", "Runtime.PushMessages"),
        (7.8, "INFO", "Sending: train message (ID: def)"),
        (8.8, "INFO", "Sent successfully"),
    ]
    lines = []
    for r in range(rounds):
        for offset, level, text in events:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start + 10 * r + int(offset)))
            lines.append(f"\x1b[92m{level} {stamp},{round(offset % 1 * 1000):03d}\x1b[0m:      {text}")
        lines.append("\x1b[92mINFO 2026-12-02 07:00:00,000\x1b[0m:      Receiving: evaluate message (ID: x)")
        lines.append("\x1b[92mINFO 2026-12-02 07:00:00,000\x1b[0m:      Received successfully")
    return "\n".join(lines)


def test_flower_overhead_breaks_a_deployment_round_down_from_the_supernode_logs(tmp_path):
    from benchmarks import flower_overhead

    path = tmp_path / "supernode_1.log"
    path.write_text(_supernode_log(time.mktime((2026, 12, 2, 7, 0, 0, 0, 0, -1)), rounds=3))
    messages = flower_overhead.node_messages(path)
    assert len(messages) == 3 and messages[1]["local_training_s"] == 1.0
    result = flower_overhead.deployment_breakdown([12.0, 11.0, 11.0], [messages])
    assert result["fixed_cost_s"] == 10.0 and result["fixed_cost_round_1_s"] == 11.0
    phases = result["breakdown_s"]
    assert phases["message to the node (SuperLink -> SuperNode)"] == 2.0
    assert phases["import of client_app.app"] == 3.4  # 7.6 - 2.6 - (0.5 + 1.0 + 0.1)
    assert phases["server side and polling (training phase minus the slowest node)"] == 2.2


def test_finetune_report_compares_each_variant_with_full_fine_tuning():
    from benchmarks import finetune

    def variant(fid, uplink):
        return {
            "final_fid": fid, "final_kid": 0.01, "total_uplink_bytes": uplink, "rounds": 4, "wall_s": 10.0,
            "forgetting": {"fid": 90.0, "kid": 0.05},
        }  # fmt: skip

    results = {
        "base": {"final_fid": 50.0},
        "variants": {"full": variant(40.0, 4_000_000), "lora4+int8": variant(44.0, 20_000)},
    }
    table, notes = finetune.report(results, "quick")
    assert "| lora4+int8 | 44.0 |" in table and "200.0x" in table and "1.100x" in table
    assert "200.0x fewer bytes at 1.100x the FID: met." in notes
    results["variants"]["lora4+int8"] = variant(48.0, 20_000)  # 1.2x the FID: missed
    assert "missed." in finetune.report(results, "quick")[1]
    overrides = finetune.finetune_overrides("lora4+int8", finetune.SCALES["quick"], [], Path("/base/model"))
    assert "model.pretrained=/base/model" in overrides and "dataset.classes=[5,6,7,8,9]" in overrides
    assert (
        "adapter=lora" in overrides and "strategy=quant" in overrides and "partition.alpha=0.3" in overrides
    )
