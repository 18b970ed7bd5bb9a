"""metrics.jsonl on resume: a partial last line is dropped with a warning; other bad lines are errors."""

from __future__ import annotations

import json
import logging
import re

import pytest
from omegaconf import OmegaConf

from server_app.federation import open_run_folder
from server_app.run_folder import MetricsError, RunFolder, read_metrics

ROWS = [{"round": 1, "train_loss": 0.5}, {"round": 2, "train_loss": 0.4}]


def _write(path, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + tail)


def _resume(run_dir):
    cfg = OmegaConf.create({"resume": str(run_dir), "run_dir": None, "output_dir": "unused"})
    return open_run_folder(cfg, None)


@pytest.mark.parametrize("tail", ['{"round": 3, "train_lo', '{"round": 3}\x00\x00', "\x00" * 8])
def test_a_partial_last_line_is_dropped_on_resume_with_a_warning(tmp_path, caplog, tail):
    folder = RunFolder(tmp_path / "run")
    _write(folder.metrics_file, tail)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _resume(folder.path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(folder.metrics_file) in warnings[0] and "line 3" in warnings[0]
    assert folder.metrics_file.read_text() == "".join(json.dumps(r, sort_keys=True) + "\n" for r in ROWS)
    assert sorted(p.name for p in folder.path.iterdir()) == ["metrics.jsonl", "samples"]  # no .tmp
    folder.append_metrics({"round": 3})  # the next row starts on a line of its own
    assert [r["round"] for r in folder.read_metrics()] == [1, 2, 3]


def test_a_complete_file_is_left_as_it_is(tmp_path, caplog):
    folder = RunFolder(tmp_path / "run")
    _write(folder.metrics_file)
    before = folder.metrics_file.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _resume(folder.path)
    assert not caplog.records and folder.metrics_file.stat().st_mtime_ns == before


def test_reading_skips_a_partial_last_line_and_names_it(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, '{"round"')
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert read_metrics(metrics) == ROWS
    assert f"{metrics} line 3" in caplog.text


@pytest.mark.parametrize("bad", ['{"round": 1, "train_lo', "[1, 2]", '{"loss": 1.0}'])
def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path, bad):
    folder = RunFolder(tmp_path / "run")
    folder.metrics_file.write_text(json.dumps(ROWS[0]) + "\n" + bad + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(MetricsError, match=re.escape(f"{folder.metrics_file} line 2 is not a JSON object")):
        _resume(folder.path)
    with pytest.raises(MetricsError, match="line 2"):
        folder.truncate_metrics(1)
