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


def test_only_names_unknown_runs():
    with pytest.raises(SystemExit, match="vanila_iid"):
        quality.plan(quality.SCALES["quick"], ["vanila_iid"])


def test_pareto_frontier_keeps_the_points_nothing_beats():
    points = [(10, 200), (1, 250), (5, 190), (2, 260)]
    assert quality.pareto_frontier(points) == [(1, 250), (5, 190)]
