"""Flower's overhead: K clients x S local steps through `flwr run` vs a plain loop.

    python benchmarks/flower_overhead.py [--quick] [--clients K] [--steps S] [--rounds R]
                                         [--engines simulation,deployment] [--results-dir DIR]

Runs, one after the other on this machine:

* **federated**: ``flwr run`` of this app in Flower's simulation engine (a local
  SuperLink started for the benchmark in its own ``FLWR_HOME``, K simulated
  SuperNodes, R rounds of S local steps each, the default tiny config, no
  checkpoints, one small evaluation at the end). The per-round training phase
  (``train_time_s`` in ``metrics.jsonl``: sending the model, the clients'
  training, replies, checks and the average) comes from the run folder.
* **deployment**: the same run on Flower's Deployment Engine: a SuperLink and K
  SuperNodes on 127.0.0.1 started (and stopped) by ``docker/local-deployment.sh
  --insecure``, each SuperNode starting a new ``flwr-clientapp`` process per
  message (Flower 1.42). Its logs (``FLWR_LOG_LEVEL=DEBUG``, timestamps) give a
  round's **fixed cost**, the training phase minus the slowest client's local
  training, and where it goes (see ``deployment_breakdown``).
* **plain**: a single Python process that trains the same model for the same
  K x S x R steps with the same code (``client_app.task.local_train`` on the
  whole training set).

Ratios: *with start-up* compares the wall time of the two commands (Python and
library imports, data loading, the SuperLink and Ray start, the final
evaluation); *without start-up* compares the federated training phases with the
plain loop's training time, for all rounds and for the rounds after the first
(round 1 also pays each simulated client's first data load and partitioning).
The app's dependencies are not installed per run
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``); with it on, Flower adds a uv
environment build to the start-up. Everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from feddm.processes import processes_mentioning, stop_process_groups  # noqa: E402

TARGET = 1.10  # simulation vs the plain loop in steady state (rounds 2..R), #19
TARGET_WITH_STARTUP = 1.3  # simulation vs the plain loop, whole commands
FIXED_COST_TARGET_S = 3.0
DATA_ROOT = REPO.parent / "shared" / "data"


def app_overrides(clients: int, steps: int, rounds: int, data_root: Path, out: Path) -> list[str]:
    """The run's Hydra overrides: default tiny config, only what the benchmark needs."""
    return [
        f"num_clients={clients}",
        f"local_steps={steps}",
        f"num_rounds={rounds}",
        f"eval.every={rounds}",
        "eval.grid_size=4",
        "eval.ddim_steps=5",
        "checkpoint_every=0",
        f"dataset.root={data_root}",
        f"output_dir={out}",
    ]


def plain_loop(overrides: list[str]) -> None:
    """Train K*S*R steps in this process; print the loop's own timing as JSON."""
    started = time.perf_counter()
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from client_app.task import build_model, local_train, read_settings
    from models import build_scheduler, build_unet, resolve_device
    from models.data import dataset_from_config
    from server_app.config import compose_config, resolve_paths
    from server_app.federation import client_config

    cfg = resolve_paths(compose_config(overrides))
    total_steps = int(cfg.num_clients) * int(cfg.local_steps) * int(cfg.num_rounds)
    torch.manual_seed(cfg.seed)
    plain = OmegaConf.to_container(cfg, resolve=True)
    unet = build_unet(
        plain["model"]["unet"], image_size=cfg.dataset.image_size, channels=cfg.dataset.channels
    )
    settings = read_settings(client_config(cfg, unet, build_scheduler(plain["scheduler"])))
    settings = settings.__class__(**{**settings.__dict__, "local_steps": total_steps})
    unet, scheduler = build_model(settings, resolve_device(cfg.device))
    dataset = dataset_from_config(cfg.dataset, train=True)
    indices = np.arange(len(dataset))
    setup_s = time.perf_counter() - started
    loop_started = time.perf_counter()
    loss, steps = local_train(unet, scheduler, dataset, indices, settings, seed=0)
    loop_s = time.perf_counter() - loop_started
    print(
        json.dumps(
            {
                "steps": steps,
                "loop_s": loop_s,
                "setup_s": setup_s,
                "loss": loss,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


def run_federated(clients: int, steps: int, rounds: int, work: Path) -> dict:
    """``flwr run`` the app in simulation; return its wall time and per-round phases."""
    flwr_home, run_dir = work / "flwr-home", work / "run"
    overrides = app_overrides(clients, steps, rounds, DATA_ROOT.resolve(), work / "outputs")
    env = dict(
        os.environ,
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    command = [
        "flwr",
        "run",
        str(REPO),
        "--stream",
        "--federation-config",
        f"num-supernodes={clients}",
        "--run-config",
        f"overrides='{' '.join(overrides)}' run-dir='{run_dir}'",
    ]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, timeout=3600)
        wall_s = time.perf_counter() - started
    finally:
        stop_process_groups(processes_mentioning(str(flwr_home)))  # the local SuperLink it started
    if result.returncode != 0 or not (run_dir / "metrics.jsonl").is_file():
        raise RuntimeError(f"flwr run failed:\n{(result.stdout + result.stderr)[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall_s, "train_time_s": [r["train_time_s"] for r in rows]}


def run_deployment(clients: int, steps: int, rounds: int, work: Path) -> dict:
    """The run on a local SuperLink and ``clients`` SuperNodes; wall time, per-round phases and log breakdown."""
    workdir = work / "deployment"
    overrides = app_overrides(clients, steps, rounds, DATA_ROOT.resolve(), work / "deployment-outputs")
    env = dict(
        os.environ,
        FLWR_LOG_LEVEL="DEBUG",  # timestamps on every line, and the app's own phases
        XDG_CACHE_HOME=str(work / "cache"),  # the nodes start without a kept data split, as on a first run
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    command = ["bash", str(REPO / "docker" / "local-deployment.sh"), "--insecure", "--nodes", str(clients)]
    command += ["--workdir", str(workdir), "--data-root", str(DATA_ROOT.resolve()), "--", *overrides]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, timeout=3600)
        wall_s = time.perf_counter() - started
    finally:
        stop_process_groups(processes_mentioning(str(workdir)))  # the launcher stops them; this is in case
    found = re.findall(r"^Run folder: (.+)$", result.stdout, flags=re.MULTILINE)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"deployment run failed:\n{(result.stdout + result.stderr)[-4000:]}")
    rows = [json.loads(line) for line in (Path(found[-1]) / "metrics.jsonl").read_text().splitlines()]
    train_time_s = [r["train_time_s"] for r in rows]
    messages = [node_messages(path) for path in sorted((workdir / "logs").glob("supernode_*.log"))]
    return {"wall_s": wall_s, "train_time_s": train_time_s, **deployment_breakdown(train_time_s, messages)}


_LINE = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\S*\s+(.*)$")
# A training message's events in a SuperNode's log, as Flower 1.42 logs them (supernode/start_client_internal.py,
# supernode/cli/flwr_clientapp.py, supernode/runtime/run_clientapp.py), and the app's own line (client_app/app.py).
_EVENTS = {
    "receiving": "Receiving: train message",
    "process": "Start `flwr-clientapp` process",
    "received": "Received successfully",
    "fab": "[flwr-clientapp] Start FAB installation.",
    "loading": "[flwr-clientapp] Start `ClientApp` Loading.",
    "app": "FedDM train: ",
    "replied": "Runtime.PushMessages",
    "sending": "Sending: train message",
    "sent": "Sent successfully",
}


def node_messages(log_path: Path) -> list[dict]:
    """Per training message of one SuperNode (in round order): each event's time and the app's phases."""
    messages: list[dict] = []
    for raw in log_path.read_text(errors="replace").splitlines():
        match = _LINE.match(re.sub(r"\x1b\[[0-9;]*m", "", raw))
        if not match:
            continue
        stamp = time.mktime(time.strptime(match[1][:19], "%Y-%m-%d %H:%M:%S")) + int(match[1][20:]) / 1000
        text = match[2].strip()
        if text.startswith("Receiving: "):
            messages.append({} if text.startswith(_EVENTS["receiving"]) else {"other": True})
        if not messages or "other" in messages[-1]:
            continue
        for event, start in _EVENTS.items():
            if text.startswith(start) and event not in messages[-1]:
                messages[-1][event] = stamp
                if event == "app":
                    numbers = [float(x) for x in re.findall(r"([0-9.]+) s", text)]
                    messages[-1].update(zip(("model_data_s", "local_training_s", "reply_s"), numbers))
    return [m for m in messages if "other" not in m and all(e in m for e in _EVENTS)]


def deployment_breakdown(train_time_s: list[float], nodes: list[list[dict]]) -> dict:
    """A round's fixed cost (training phase minus the slowest client's local training) and where it goes.

    Medians over the rounds after the first (round 1 also pays the first split and
    the file cache's first reads); per-message phases are medians over nodes and
    those rounds. Phases on a node overlap where noted; "server side" is what the
    node's log does not hold: the ServerApp pushing the message to the SuperLink,
    the SuperNode's poll (every 3 s when idle), the ServerApp's poll for replies
    (every 3 s) and the aggregation.
    """
    rounds = min(len(train_time_s), *(len(m) for m in nodes)) if nodes else 0
    if rounds < 2:
        return {"fixed_cost_s": None, "breakdown_s": {}}
    fixed = [train_time_s[r] - max(n[r]["local_training_s"] for n in nodes) for r in range(rounds)]
    later = [n[r] for n in nodes for r in range(1, rounds)]

    def median(phase) -> float:
        return round(statistics.median(phase(m) for m in later), 3)

    breakdown = {
        "message to the node (SuperLink -> SuperNode)": median(lambda m: m["received"] - m["receiving"]),
        "flwr-clientapp start (SuperExec poll, spawn, Flower imports; overlaps the above)": median(
            lambda m: m["process"] - m["receiving"]
        ),
        "task input to the ClientApp": median(lambda m: m["fab"] - max(m["received"], m["process"])),
        "FAB install": median(lambda m: m["loading"] - m["fab"]),
        "import of client_app.app": median(
            lambda m: m["app"] - m["loading"] - m["model_data_s"] - m["local_training_s"] - m["reply_s"]
        ),
        "model and data (build, weights, dataset, split)": median(lambda m: m["model_data_s"]),
        "local training": median(lambda m: m["local_training_s"]),
        "reply (encode, hand to the SuperNode)": median(lambda m: m["reply_s"] + m["replied"] - m["app"]),
        "reply to the SuperLink": median(lambda m: m["sent"] - m["sending"]),
        "on the node, message received to reply sent": median(lambda m: m["sent"] - m["receiving"]),
    }
    node_total = statistics.median(
        max(n[r]["sent"] - n[r]["receiving"] for n in nodes) for r in range(1, rounds)
    )
    breakdown["server side and polling (training phase minus the slowest node)"] = round(
        statistics.median(train_time_s[1:rounds]) - node_total, 3
    )
    return {
        "fixed_cost_s": round(statistics.median(fixed[1:]), 3),
        "fixed_cost_round_1_s": round(fixed[0], 3),
        "fixed_cost_per_round_s": [round(f, 3) for f in fixed],
        "breakdown_s": breakdown,
    }


def run_plain(clients: int, steps: int, rounds: int, work: Path) -> dict:
    """The plain loop in a fresh Python process; its wall time and its own timings."""
    overrides = app_overrides(clients, steps, rounds, DATA_ROOT.resolve(), work / "outputs")
    command = [sys.executable, __file__, "--plain-loop", json.dumps(overrides)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=3600, check=False)
    wall_s = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"plain loop failed:\n{result.stderr[-4000:]}")
    return {"wall_s": wall_s, **json.loads(result.stdout.strip().splitlines()[-1])}


def report(plain: dict, runs: dict, clients: int, steps: int, rounds: int) -> tuple[dict, str, str]:
    """(results, Markdown table, notes) of the plain loop and the engines' ``runs``."""
    per_step = plain["loop_s"] / plain["steps"]
    steps_per_round = clients * steps
    results = {
        "clients": clients,
        "local_steps": steps,
        "rounds": rounds,
        "total_steps": clients * steps * rounds,
        "plain": plain,
        "plain_step_s": per_step,
        "target": TARGET,
        "target_with_startup": TARGET_WITH_STARTUP,
    }
    rows = [["plain loop (one process)", f"{plain['wall_s']:.1f}", f"{plain['loop_s']:.1f}", "-", "1.00"]]
    notes = [
        f"{clients} clients x {steps} local steps x {rounds} rounds = {results['total_steps']} steps of the "
        f"tiny UNet (batch 32); plain loop {per_step * 1000:.0f} ms per step."
    ]
    for key, label in (("federated", "flwr run simulation"), ("deployment", "Deployment Engine, 127.0.0.1")):
        if key not in runs:
            continue
        run = runs[key]
        phases = run["train_time_s"]
        ratios = {
            "with_startup": run["wall_s"] / plain["wall_s"],
            "without_startup_all_rounds": sum(phases) / plain["loop_s"],
            "without_startup_after_round_1": sum(phases[1:]) / (per_step * steps_per_round * (rounds - 1)),
        }
        results[key] = run
        prefix = "" if key == "federated" else "deployment_"
        results.update({f"{prefix}ratio_{name}": value for name, value in ratios.items()})
        rows.append(
            [
                label,
                f"{run['wall_s']:.1f}",
                f"{sum(phases):.1f}",
                " / ".join(f"{p:.1f}" for p in phases),
                f"{ratios['with_startup']:.2f} with start-up",
            ]
        )
        notes.append(
            f"**{label}**: with start-up {ratios['with_startup']:.2f}x; without start-up, all rounds "
            f"{ratios['without_startup_all_rounds']:.3f}x, rounds 2..{rounds} "
            f"{ratios['without_startup_after_round_1']:.3f}x; round 1 "
            f"{phases[0] - sum(phases[1:]) / (rounds - 1):.1f} s more than a later round."
        )
    if "federated" in runs:
        # Round 1 also holds each simulated client's start-up (imports, data, partition).
        results["target_met"] = results["ratio_without_startup_after_round_1"] <= TARGET
        results["target_with_startup_met"] = results["ratio_with_startup"] <= TARGET_WITH_STARTUP
        notes.append(
            f"Targets for the simulation: <= {TARGET} without start-up (rounds 2..{rounds}): "
            f"{'met' if results['target_met'] else 'MISSED'}; <= {TARGET_WITH_STARTUP} with start-up: "
            f"{'met' if results['target_with_startup_met'] else 'MISSED'}. Round 1 also holds each simulated client's "
            "start-up in its Ray worker (importing the ClientApp's libraries, loading and partitioning the "
            "data). The app's dependencies were not reinstalled per run "
            "(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1)."
        )
    if "deployment" in runs and runs["deployment"]["fixed_cost_s"] is not None:
        deployment = runs["deployment"]
        results["fixed_cost_target_s"] = FIXED_COST_TARGET_S
        results["fixed_cost_target_met"] = deployment["fixed_cost_s"] <= FIXED_COST_TARGET_S
        notes.append(
            f"A deployment round's fixed cost (training phase minus the slowest client's local training), "
            f"rounds 2..{rounds}: {deployment['fixed_cost_s']:.2f} s (round 1: "
            f"{deployment['fixed_cost_round_1_s']:.2f} s); target <= {FIXED_COST_TARGET_S:g} s: "
            f"{'met' if results['fixed_cost_target_met'] else 'MISSED'}. Each message is a new flwr-clientapp "
            "process (Flower 1.42). Where a later round's time goes (medians over nodes and rounds, s):"
        )
        notes.append(
            markdown_table(
                ["phase", "s"], [[name, f"{s:.2f}"] for name, s in deployment["breakdown_s"].items()]
            )
        )
    table = markdown_table(
        ["what", "wall s (whole command)", "training s", "training s per round", "ratio"], rows
    )
    return results, table, "\n\n".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 clients x 20 steps x 3 rounds")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="local steps per round (default 50)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--engines",
        default="simulation,deployment",
        help="comma-separated: simulation, deployment (default both)",
    )
    parser.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--plain-loop", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        plain_loop(json.loads(args.plain_loop))
        return
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is reported apart)")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - {"simulation", "deployment"}:
        parser.error(f"--engines takes simulation and/or deployment, got {args.engines!r}")
    steps = args.steps or (20 if args.quick else 50)
    clients, rounds = args.clients, args.rounds
    # Warm the file cache, so neither side pays for the first read of the libraries.
    subprocess.run([sys.executable, "-c", "import torch, diffusers, flwr, ray, datasets"], check=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="feddm-overhead-") as tmp:
        work = Path(tmp)
        plain = run_plain(clients, steps, rounds, work)
        if "simulation" in engines:
            runs["federated"] = run_federated(clients, steps, rounds, work)
        if "deployment" in engines:
            runs["deployment"] = run_deployment(clients, steps, rounds, work)

    results, table, notes_text = report(plain, runs, clients, steps, rounds)
    print(write_results("flower_overhead", results, table, notes_text, folder=args.results_dir))
    print(table)
    print(notes_text)


if __name__ == "__main__":
    main()
