"""The benchmarks' run plans compose into valid configs (their results are measured, not tested)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import quality
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


def test_pareto_frontier_keeps_the_points_nothing_beats():
    points = [(10, 200), (1, 250), (5, 190), (2, 260)]
    assert quality.pareto_frontier(points) == [(1, 250), (5, 190)]
