"""The Deployment Engine on 127.0.0.1: two SuperNodes with TLS and node authentication train FedDM-quant."""

from __future__ import annotations

import pytest

from tests.conftest import MICRO_MODEL, SHORT_RUN
from tests.deployment import finish, launch, metrics_rows, run_folder_of

pytestmark = pytest.mark.slow


def test_two_supernodes_with_tls_train_feddm_quant(tmp_path, data_root):
    workdir = tmp_path / "deployment"
    # Clients evaluate in round 2 only (eval.every=2): one message phase less to wait for.
    overrides = [*MICRO_MODEL, *SHORT_RUN, "strategy=quant", "eval.every=2", f"output_dir={tmp_path / 'out'}"]
    process = launch(workdir, 2, overrides)
    output = finish(process, workdir, timeout=600)
    assert process.returncode == 0, output[-3000:]
    run_dir = run_folder_of(output)
    assert [r["round"] for r in metrics_rows(run_dir)] == [1, 2]
    assert all(r["num_aggregated"] == 2 for r in metrics_rows(run_dir))
    assert "eval_loss" in metrics_rows(run_dir)[1]
    for name in ("config.yaml", "samples/round_0002.png", "model/model_index.json", "checkpoint.safetensors"):
        assert (run_dir / name).is_file(), name
    # TLS and SuperNode authentication were on
    assert (workdir / "credentials" / "certificates" / "ca.crt").is_file()
    assert "registered successfully" in (workdir / "logs" / "register_1.log").read_text()
