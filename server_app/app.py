"""The FedDM ServerApp (Flower Message API).

Run config keys (``pyproject.toml``, ``flwr run . --run-config``):

* ``overrides``: Hydra overrides of ``conf/config.yaml``, space separated;
* ``run-dir``: the run folder (empty: a new folder under ``output_dir``).

``overrides="resume=RUN_DIR"`` continues that run: its ``config.yaml`` and
checkpoint are read here, on the ServerApp's machine (``run_federation``).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server_app.config import compose_config, refuse_simulation_overrides
from server_app.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the config from the run config's overrides and train."""
    overrides = str(context.run_config.get("overrides", ""))
    refuse_simulation_overrides(overrides)
    cfg = compose_config(overrides)
    run_federation(grid, cfg, str(context.run_config.get("run-dir", "")) or None)
