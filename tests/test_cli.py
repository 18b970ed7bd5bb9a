"""feddm-run's front door: config errors alone, exit status 2; Flower's start-up log kept short."""

from __future__ import annotations

import logging
import sys

import pytest

from feddm.cli import CONFIG_ERROR_STATUS, check_overrides, main
from server_app.federation import quiet_config_records


def test_every_job_of_a_sweep_is_checked_before_the_first_starts():
    errors = check_overrides(["-m", "strategy=vanilla,quant", "lr=0,0.1"])
    assert len(errors) == 2 and all("lr=0 is not allowed" in e for e in errors)
    assert "[strategy=vanilla lr=0]" in errors[0] and "[strategy=quant lr=0]" in errors[1]
    assert check_overrides(["strategy=quant", "num_rounds=2"]) == []
    assert check_overrides(["--cfg", "job"]) == []  # Hydra's own flags: left to Hydra


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=ldm"], "model.autoencoder.path=None is not allowed"),
        (["num_roundz=3"], "Could not override 'num_roundz'"),
        (["strategy=bogus"], "Could not find 'strategy/bogus'"),
        (["lr=["], "no viable alternative"),
    ],
)
def test_a_config_error_prints_alone_and_exits_with_status_2(args, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["feddm-run", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == CONFIG_ERROR_STATUS == 2
    assert message in err and "Traceback" not in err and "HYDRA_FULL_ERROR" not in err


def test_flowers_config_record_log_lists_keys_not_values(caplog):
    logger = logging.getLogger("flwr")
    big = "{" + ", ".join(f"'key-{i}': '{'x' * 50}'" for i in range(10)) + "}"
    with caplog.at_level(logging.INFO, logger="flwr"), quiet_config_records():
        logger.info("\t├── ConfigRecord (train): %s", big)
    first = caplog.records[0].getMessage()
    assert "10 keys (key-0, key-1" in first and "x" * 50 not in first
