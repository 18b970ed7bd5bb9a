"""Simulation resources from the config: what Flower's Ray backend and ``ray.init`` get, and bad values.

Nothing here starts Ray: Flower's ``run_simulation`` is stopped where it hands the backend
config to its main loop, and ``RayBackend`` is given a stand-in for ``ray``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import parse_config_args
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.serverapp import ServerApp
from flwr.simulation.app import _run_simulation_settings
from flwr.supercore.utils import simulation_config_from_json

import feddm.cli
import feddm.simulation
from feddm.simulation import ray_backend_config, simulate
from server_app.app import main as server_main
from server_app.config import ConfigError, compose_config, validate_config
from tests.conftest import MICRO_OVERRIDES, REPO_ROOT

# The module (``flwr.simulation.run_simulation`` as an attribute is the function of the same name).
flower_simulation = importlib.import_module("flwr.simulation.run_simulation")


def _flower_stream(backend_config: dict | None) -> dict:
    """The backend config Flower's ``run_simulation`` hands to its engine (its own defaults filled in)."""
    seen = {}

    def stop(*args):
        seen["stream"] = args[2]  # num_supernodes, backend_name, backend_config_stream, ...

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flower_simulation, "_main_loop", stop)
        flower_simulation.run_simulation(ServerApp(), ClientApp(), 2, backend_config=backend_config)
    return json.loads(seen["stream"])


def _ray_init_kwargs(stream: dict, monkeypatch) -> dict:
    """The keyword arguments Flower's RayBackend passes to ``ray.init`` for ``stream``."""
    calls = []

    class FakeRay:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**kwargs) -> None:
            calls.append(kwargs)

    monkeypatch.setattr(raybackend, "ray", FakeRay)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # init_ray rewrites it
    raybackend.RayBackend(stream)
    assert len(calls) == 1
    return calls[0]


def test_cpu_defaults_start_flower_exactly_as_before():
    # Before these keys, simulate() passed no backend config on CPU: Flower's defaults applied.
    ours = ray_backend_config(compose_config(), gpu_available=False)
    assert ours == {"client_resources": {"num_cpus": 2, "num_gpus": 0.0}, "init_args": {}}
    assert json.dumps(_flower_stream(ours)) == json.dumps(_flower_stream(None))


def test_device_cpu_keeps_the_cpu_defaults_on_a_gpu_machine():
    cfg = compose_config(["device=cpu", "num_clients=10"])
    assert ray_backend_config(cfg, gpu_available=True)["client_resources"] == {"num_cpus": 2, "num_gpus": 0.0}


@pytest.mark.parametrize(("num_clients", "share"), [(1, 1.0), (2, 0.5), (4, 0.25), (10, 0.25), (1000, 0.25)])
def test_automatic_gpu_share_lets_at_most_four_clients_share_a_gpu(num_clients, share, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a (mocked) GPU machine
    resources = ray_backend_config(compose_config([f"num_clients={num_clients}"]))["client_resources"]
    assert resources == {"num_cpus": 1, "num_gpus": share}


def test_set_resources_win_over_the_automatic_ones():
    cfg = compose_config(
        [
            "simulation.client_resources.num_cpus=0.5",
            "simulation.client_resources.num_gpus=2",
            "num_clients=10",
        ]
    )
    validate_config(cfg)
    assert ray_backend_config(cfg, gpu_available=True)["client_resources"] == {"num_cpus": 0.5, "num_gpus": 2}


def test_ray_address_reaches_ray_init(monkeypatch):
    cfg = compose_config(["simulation.ray_address=head-node:6379", "simulation.client_resources.num_cpus=1"])
    validate_config(cfg)
    stream = _flower_stream(ray_backend_config(cfg, gpu_available=False))
    assert stream["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    kwargs = _ray_init_kwargs(stream, monkeypatch)
    assert kwargs["address"] == "head-node:6379"
    # ray.init refuses these when it joins a running cluster: Flower must not pass them.
    assert not {"num_cpus", "num_gpus", "resources", "object_store_memory"} & set(kwargs)


def test_no_ray_address_lets_ray_start_its_own_instance(monkeypatch):
    kwargs = _ray_init_kwargs(_flower_stream(ray_backend_config(compose_config(), False)), monkeypatch)
    assert "address" not in kwargs


def test_simulate_hands_the_built_backend_config_to_flower(monkeypatch, data_root, tmp_path):
    seen = {}
    monkeypatch.setattr(feddm.simulation, "run_simulation", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_config([*MICRO_OVERRIDES, "simulation.ray_address=auto"])
    with pytest.raises(RuntimeError, match="ended before the run finished"):
        simulate(cfg, tmp_path / "run")
    assert seen["backend_config"] == {
        "client_resources": {"num_cpus": 2, "num_gpus": 0.0},
        "init_args": {"address": "auto"},
    }


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("simulation.client_resources.num_cpus=0", "null (automatic) or a number > 0"),
        ("simulation.client_resources.num_cpus=-2", "null (automatic) or a number > 0"),
        ("simulation.client_resources.num_gpus=-0.5", "a number in [0, 1] or an integer >= 1"),
        ("simulation.client_resources.num_gpus=1.5", "a number in [0, 1] or an integer >= 1"),
        ("simulation.client_resources.num_gpus=two", "a number in [0, 1] or an integer >= 1"),
        ("simulation.ray_address=head", "auto | HOST:PORT"),
        ("simulation.ray_address=head:70000", "port 1..65535"),
        ("simulation.ray_address=ray://head:10001", "auto | HOST:PORT"),
        ("simulation.ray_address=6379", "auto | HOST:PORT"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(override, allowed):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config([override]))
    key, value = override.split("=")
    assert re.search(rf"{re.escape(key)}=\S*{re.escape(value)}\S* is not allowed", str(err.value))
    assert allowed in str(err.value)


@pytest.mark.parametrize("address", ["auto", "localhost:6379", "10.0.0.7:6379", "head-1.cluster.local:6380"])
def test_good_ray_addresses_validate(address):
    validate_config(compose_config([f"simulation.ray_address={address}"]))


def test_a_gpu_share_needs_a_gpu_here_or_a_cluster():
    cfg = compose_config(["simulation.client_resources.num_gpus=0.5"])
    with pytest.raises(
        ConfigError, match=r"num_gpus=0.5 is not allowed: 0 or null on a machine without a CUDA"
    ):
        ray_backend_config(cfg, gpu_available=False)
    cfg.simulation.ray_address = "head:6379"  # the cluster's machines may have GPUs
    assert ray_backend_config(cfg, gpu_available=False)["client_resources"]["num_gpus"] == 0.5


@pytest.mark.parametrize(
    ("overrides", "gpu", "why"),
    [
        (["device=cuda"], False, "null means 0 here: this machine has no CUDA GPU"),
        (["device=cuda", "simulation.client_resources.num_gpus=0"], True, "set it, e.g. 0.25"),
    ],
)
def test_device_cuda_needs_a_gpu_share(overrides, gpu, why):
    with pytest.raises(ConfigError, match="num_gpus=0.* is not allowed: more than 0 with device=cuda") as err:
        ray_backend_config(compose_config(overrides), gpu_available=gpu)
    assert why in str(err.value)


def test_feddm_run_refuses_simulation_keys_for_a_superlink(monkeypatch, tmp_path):
    def no_flwr_run(*args, **kwargs):
        raise AssertionError("flwr run started")

    monkeypatch.setattr(subprocess, "run", no_flwr_run)
    monkeypatch.setattr(feddm.cli, "_stream", no_flwr_run)
    cfg = compose_config(["simulation.client_resources.num_gpus=0.5", "superlink=remote"])
    overrides = ["superlink=remote", "simulation.client_resources.num_gpus=0.5"]
    with pytest.raises(ConfigError, match=r"num_gpus=0.5 is not allowed with flwr run.*--federation-config"):
        feddm.cli.submit(cfg, tmp_path, overrides)


def test_the_server_app_refuses_simulation_keys_under_flwr_run():
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"overrides": "num_rounds=1 simulation.ray_address=head:6379", "run-dir": ""},
    )
    with pytest.raises(ConfigError, match=r"simulation.ray_address=head:6379 is not allowed with flwr run"):
        server_main(None, context)


def test_readme_federation_config_commands_parse_with_flowers_parser():
    # flwr run's own path to client resources: what the README shows must reach the Ray backend.
    readme = (REPO_ROOT / "README.md").read_text()
    commands = re.findall(r'--federation-config "([^"]*client-resources[^"]*)"', readme)
    assert commands
    for command in commands:
        values = {k.replace("-", "_"): v for k, v in parse_config_args([command]).items()}
        _, _, backend, _, _ = _run_simulation_settings(simulation_config_from_json(values))
        assert backend["client_resources"] == {
            "num_cpus": values["client_resources_num_cpus"],
            "num_gpus": pytest.approx(values["client_resources_num_gpus"]),  # a float32 on the wire
        }


def test_readme_shows_the_cluster_commands():
    section = (REPO_ROOT / "README.md").read_text().split("### Simulation resources and a Ray cluster")[1]
    section = section.split("\n## ")[0].split("\n### ")[0]
    for command in ("ray start --head --port=6379", "ray start --address=", "simulation.ray_address="):
        assert command in section, command
