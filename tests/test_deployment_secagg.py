"""SecAgg+ over the Deployment Engine: two SuperNodes with TLS run the four protocol stages."""

from __future__ import annotations

import pytest

from tests.conftest import MICRO_MODEL, SHORT_RUN
from tests.deployment import finish, launch, metrics_rows, run_folder_of

pytestmark = pytest.mark.slow


def test_two_supernodes_with_tls_train_with_secure_aggregation(tmp_path, data_root):
    # Each message starts a ClientApp process, and SecAgg+ sends four per round: one round only.
    workdir = tmp_path / "deployment"
    overrides = [*MICRO_MODEL, *SHORT_RUN, "privacy=secagg", "num_rounds=1", f"output_dir={tmp_path / 'out'}"]
    process = launch(workdir, 2, overrides)
    output = finish(process, workdir, timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert "Secure aggregation completed." in output
    (row,) = metrics_rows(run_folder_of(output))
    assert row["num_aggregated"] == 2 and "eval_loss" in row
    # the masked int64 vectors and the keys of four stages, counted as they went
    assert row["uplink_bytes"] > 1.8 * row["eval_downlink_bytes"]
