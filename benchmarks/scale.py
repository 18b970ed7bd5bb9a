"""Scale: 10, 100 and 1000 simulated clients, 10 per round: memory, start-up and seconds per round.

    python benchmarks/scale.py --quick                   # issue #17's scale, 2 CPU cores
    python benchmarks/scale.py                           # 10 local steps x 5 rounds, and the state cost
    python benchmarks/scale.py --quick --populations 10 1000 --strategies vanilla --rounds 1 --no-write
    python benchmarks/scale.py --state-cost-only         # only the client state cost per client

**Scale runs.** For each population (``--populations``, default 10 100 1000) and
strategy (``--strategies``: vanilla; quant with error feedback; partial exchange,
udec preset) one ``feddm-run`` process (``python -m feddm.cli``) trains the tiny
UNet on Fashion-MNIST split with Dirichlet alpha 0.3, 10 clients drawn per round
(``clients_per_round``), 2 drawn to evaluate in the last round, no checkpoints,
no FID, a 4-image DDIM-5 grid. The benchmark measures, from outside:

* **peak memory of the process tree**: a thread here walks ``/proc`` every 0.5 s
  (less often if a sample would take more than 5 % of a core),
  finds the run's process and all its descendants (Ray's gcs_server, raylet,
  dashboard and workers are started under the driver; processes in its session
  are counted too) and sums their PSS and RSS from ``/proc/PID/smaps_rollup``.
  PSS (proportional set size: each shared page split among the processes that
  map it) is the figure compared with the target; the RSS sum counts the
  shared libraries of every Ray worker again and is reported beside it.
  Processes that vanish between reads are skipped.
* **start-up and seconds per round**: the run's output is read line by line as
  it arrives and timestamped here. Start-up is the time from the process start
  to Flower's ``[ROUND 1/N]`` line (imports, data check, Ray start, the nodes,
  the server's partition sizes); round k lasts from ``[ROUND k/N]`` to
  ``[ROUND k+1/N]`` (the last one to ``Strategy execution finished``). Round 1
  also pays each client worker's start-up and the query of every node's
  partition id; the mean of rounds 2..N is the figure compared across
  populations (target: at 1000 clients within 1.2x of 10 clients, since a
  round's cost should depend on the clients drawn, not on the population). The
  last round includes the evaluation. ``metrics.jsonl`` gives ``train_time_s``
  (the training phase alone) and ``sampled_partitions`` of each round.

With 1000 Dirichlet partitions of 60,000 images, flwr-datasets'
``DirichletPartitioner`` may not find a split in which every partition has
``partition.min_partition_size`` images (it gives up after 10 draws); the
benchmark checks each population here first, with the clients' own code, and
lowers the minimum (10, 5, 2, 1) until a split exists; the value used is
recorded. ``--client-state disk`` runs the clients with their state on disk
(``client_state=disk``, under the run folder) instead of in memory.

**Client state cost per client** (``--state-cost``, part of the full run): for
the tiny and the fashion_mnist UNet, quant with error feedback and partial udec
each run 2 clients for 1 round of 1 step (batch 2, no FID) with
``client_state=disk``; every client that trained keeps its state in
``CLIENT_STATE_DIR/run-RUN_ID/partition-PID.safetensors``. The benchmark reports
the mean file size and tensor count per client and its projection to 1000
clients.

Every process a run starts (its process group and every process of its tree
seen by the sampler) is stopped when the run ends, fails or is interrupted.
Results: ``benchmarks/results/scale.{json,md}`` (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, write_results  # noqa: E402

TARGET_ROUND_RATIO = 1.2  # seconds per round at 1000 clients / at 10 clients
TARGET_PEAK_PSS_GIB = 8.0  # peak PSS of the whole process tree at 1000 clients
CLIENTS_PER_ROUND = 10
EVAL_CLIENTS_PER_ROUND = 2
DIRICHLET_ALPHA = 0.3
MIN_PARTITION_SIZES = (10, 5, 2, 1)  # the schema's default first, then lower until a split exists
SAMPLE_INTERVAL_S = 0.5
# Reading smaps_rollup walks each process's page tables (about 10 ms of kernel time per GiB-sized Ray
# worker here): the sampler waits longer between samples to stay under this share of one core.
SAMPLER_MAX_CPU_SHARE = 0.05
PROJECTED_CLIENTS = 1000

STRATEGIES = {
    "vanilla": ["strategy=vanilla"],
    "quant": ["strategy=quant", "strategy.error_feedback=true"],
    "partial_udec": ["strategy=partial", "strategy.preset=udec"],
}
STATE_COST_STRATEGIES = ("quant", "partial_udec")  # the strategies whose clients keep state
STATE_COST_MODELS = ("tiny", "fashion_mnist")
SCALES = {
    "quick": {"local_steps": 5, "rounds": 3},  # issue #17: a few local steps, 3 rounds
    "full": {"local_steps": 10, "rounds": 5},
}

ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")
END_OF_ROUNDS = "Strategy execution finished"
PARTITION_QUERY_LINE = re.compile(r"Sampling: (\d+) nodes reported their partition id")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


# --- The process tree and its memory, from /proc ---


@dataclass(frozen=True)
class ProcInfo:
    state: str  # R, S, D, Z (zombie: exited, not yet reaped), ...
    ppid: int
    session: int
    start_ticks: int  # start time since boot: tells a process from a later one with the same pid


def read_proc_info(pid: int) -> ProcInfo | None:
    """Parent, session and start time of ``pid`` from ``/proc/PID/stat``; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields_after_name = text[text.rindex(")") + 2 :].split()
    # Fields 4 (ppid), 6 (session) and 22 (starttime), counted from the state (field 3) at index 0.
    return ProcInfo(
        fields_after_name[0], int(fields_after_name[1]), int(fields_after_name[3]), int(fields_after_name[19])
    )


def process_table() -> dict[int, ProcInfo]:
    """Every process of this machine visible in /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (info := read_proc_info(int(entry.name))) is not None:
            table[int(entry.name)] = info
    return table


def tree_pids(root: int, table: dict[int, ProcInfo]) -> set[int]:
    """``root``, its descendants and the processes of its session (if ``root`` leads one)."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found, todo = set(), [root] if root in table else []
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    found |= {pid for pid, info in table.items() if info.session == root}
    return found


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) of ``pid`` in KiB from ``/proc/PID/smaps_rollup``; None if it is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            values[key] = int(rest.split()[0])
    if "Pss" not in values or "Rss" not in values:
        return None  # a zombie or a kernel thread: no mappings
    return values["Pss"], values["Rss"]


def command_line(pid: int, limit: int = 80) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:limit]
    except OSError:
        return "?"


class TreeMemorySampler(threading.Thread):
    """Sums PSS and RSS over the process tree of ``root`` every ``interval_s``; keeps the peaks.

    A sample that costs more than ``SAMPLER_MAX_CPU_SHARE`` of the interval in CPU time
    stretches the wait before the next one, so the sampler never takes more than that
    share of a core from the run it measures. ``seen`` maps every pid ever found in the tree
    to its start time, so the run's processes can be stopped afterwards even if they left
    its process group.
    """

    def __init__(self, root: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(daemon=True, name="tree-memory-sampler")
        self.root, self.interval_s = root, interval_s
        self.peak_pss_kib = self.peak_rss_kib = self.peak_processes = self.samples = 0
        self.peak_pss_top: list[tuple[str, int]] = []  # the largest processes at the PSS peak
        self.seen: dict[int, int] = {}
        self.cpu_s = 0.0  # this thread's CPU time spent sampling
        self.started = time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        self.started = time.monotonic()
        while not self._stop_event.is_set():
            cpu_before = time.thread_time()
            self.sample_once()
            cost = time.thread_time() - cpu_before
            self.cpu_s += cost
            self._stop_event.wait(max(self.interval_s, cost / SAMPLER_MAX_CPU_SHARE))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def sample_once(self) -> None:
        table = process_table()
        pids = tree_pids(self.root, table)
        for pid in pids:
            self.seen.setdefault(pid, table[pid].start_ticks)
        per_process = {pid: m for pid in pids if (m := memory_kib(pid)) is not None}
        pss = sum(m[0] for m in per_process.values())
        rss = sum(m[1] for m in per_process.values())
        self.samples += 1
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_processes = max(self.peak_processes, len(per_process))
        if pss > self.peak_pss_kib:
            self.peak_pss_kib = pss
            largest = sorted(per_process.items(), key=lambda item: -item[1][0])[:8]
            self.peak_pss_top = [(command_line(pid), m[0]) for pid, m in largest]

    def report(self) -> dict[str, Any]:
        return {
            "peak_pss_gib": self.peak_pss_kib / 2**20,
            "peak_rss_gib": self.peak_rss_kib / 2**20,
            "peak_processes": self.peak_processes,
            "memory_samples": self.samples,
            "mean_sample_interval_s": (time.monotonic() - self.started) / max(self.samples, 1),
            "sampler_cpu_s": self.cpu_s,
            "largest_at_peak_pss_mib": [[cmd, round(kib / 1024, 1)] for cmd, kib in self.peak_pss_top],
        }


def stop_run(process: subprocess.Popen, seen: dict[int, int], timeout_s: float = 20.0) -> None:
    """Stop the run: SIGTERM to its process group, SIGKILL to what is left, then to every process of its
    tree that is still there (and still the same process), e.g. Ray's, should any have left the group.

    Not ``feddm.processes.stop_process_groups``: it waits for /proc entries to go, and the run's own
    process stays there as a zombie until this process reaps it.
    """
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process.pid, signal.SIGKILL)  # the group outlives its leader while Ray's processes run
    process.wait()
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        left = [pid for pid, start in seen.items() if _same_process(pid, start)]
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait_s
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [pid for pid in left if _same_process(pid, seen[pid])]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _same_process(pid: int, start_ticks: int) -> bool:
    """Whether ``pid`` still runs (not a zombie) and is the process that started at ``start_ticks``."""
    info = read_proc_info(pid)
    return info is not None and info.start_ticks == start_ticks and info.state != "Z"


# --- Timings from the run's output ---


def round_timings(timed_lines: list[tuple[float, str]]) -> dict[str, Any]:
    """Start-up and per-round seconds from (seconds since the process started, line) pairs.

    Round k lasts from Flower's ``[ROUND k/N]`` line to the next one, the last round
    until ``Strategy execution finished``. A round without an end is left out.
    """
    round_starts: dict[int, float] = {}
    end_of_rounds = partition_query = None
    for seconds, raw in timed_lines:
        line = ANSI_ESCAPE.sub("", raw)
        if match := ROUND_LINE.search(line):
            round_starts.setdefault(int(match.group(1)), seconds)
        elif END_OF_ROUNDS in line and end_of_rounds is None:
            end_of_rounds = seconds
        elif PARTITION_QUERY_LINE.search(line) and partition_query is None:
            partition_query = seconds
    rounds = sorted(round_starts)
    ends = [round_starts.get(k + 1) for k in rounds[:-1]] + [end_of_rounds]
    round_s = [end - round_starts[k] for k, end in zip(rounds, ends) if end is not None]
    later = round_s[1:]
    first_round = round_starts.get(1)
    return {
        "startup_s": first_round,
        "round_s": round_s,
        "first_round_s": round_s[0] if round_s else None,
        "later_rounds_mean_s": sum(later) / len(later) if later else None,
        # Round 1 starts by asking every node for its partition id (client sampling).
        "partition_query_s": (
            partition_query - first_round if None not in (partition_query, first_round) else None
        ),
    }


# --- One run ---


@dataclass
class ChildRun:
    returncode: int | None
    wall_s: float
    timed_lines: list[tuple[float, str]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False


def run_feddm(overrides: list[str], log_path: Path, timeout_s: float) -> ChildRun:
    """``python -m feddm.cli OVERRIDES`` in its own session, sampled and timed; everything stopped after."""
    command = [sys.executable, "-m", "feddm.cli", *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # This checkout's code, whichever one the virtual environment installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run = ChildRun(returncode=None, wall_s=0.0)
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    sampler = TreeMemorySampler(process.pid)
    sampler.start()
    reader = threading.Thread(
        target=_timestamp_lines, args=(process, started, run.timed_lines, log_path, command), daemon=True
    )
    reader.start()
    try:
        run.returncode = process.wait(timeout=timeout_s)
        run.wall_s = time.monotonic() - started
        reader.join(timeout=10)  # what is still in the pipe (Ray's processes may hold it open)
    except subprocess.TimeoutExpired:
        run.timed_out, run.wall_s = True, time.monotonic() - started
    finally:
        sampler.stop()
        stop_run(process, sampler.seen)
        reader.join(timeout=10)
    run.memory = sampler.report()
    return run


def _timestamp_lines(
    process: subprocess.Popen, started: float, timed_lines: list, log_path: Path, command: list[str]
) -> None:
    """Append (seconds since ``started``, line) for each line of the run's output; copy it to ``log_path``."""
    with log_path.open("w") as log:
        log.write("+ " + " ".join(command) + "\n")
        for line in process.stdout:
            timed_lines.append((time.monotonic() - started, line.rstrip("\n")))
            log.write(f"[{timed_lines[-1][0]:9.2f}] {line}")
            log.flush()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def output_tail(run: ChildRun, lines: int = 30) -> str:
    return "\n".join(ANSI_ESCAPE.sub("", line) for _, line in run.timed_lines[-lines:])


# --- Scale runs ---


def base_overrides(data_root: Path) -> list[str]:
    return [f"dataset.root={data_root}", "dataset.download=false", "checkpoint_every=0", "eval.num_samples=0"]


def dirichlet_min_partition_size(population: int, data_root: Path, seed: int = 0) -> int:
    """The largest of ``MIN_PARTITION_SIZES`` for which flwr-datasets finds a Dirichlet split.

    The same code and arguments as the clients and the server (``client_app.partition``).
    """
    from omegaconf import OmegaConf

    from client_app.partition import partition_sizes
    from models.data import dataset_from_config
    from server_app.config import compose_config

    cfg = compose_config(
        [
            *base_overrides(data_root),
            "partition=dirichlet",
            f"partition.alpha={DIRICHLET_ALPHA}",
            f"seed={seed}",
        ]
    )
    labels = dataset_from_config(cfg.dataset, train=True).labels
    partition = OmegaConf.to_container(cfg.partition, resolve=True)
    for size in MIN_PARTITION_SIZES:
        try:
            with warnings.catch_warnings():  # one warning per failed draw
                warnings.simplefilter("ignore")
                partition_sizes(
                    labels, {**partition, "min_partition_size": size}, num_partitions=population, seed=seed
                )
        except ValueError:
            continue
        return size
    raise RuntimeError(f"no Dirichlet split of {population} partitions with alpha {DIRICHLET_ALPHA}")


def scale_overrides(
    population: int,
    strategy: str,
    settings: dict[str, int],
    data_root: Path,
    run_dir: Path,
    min_partition_size: int,
    client_state: str,
) -> list[str]:
    """The Hydra overrides of one scale run."""
    overrides = [
        *base_overrides(data_root),
        "model=tiny",
        f"num_clients={population}",
        f"clients_per_round={min(CLIENTS_PER_ROUND, population)}",
        f"eval_clients_per_round={min(EVAL_CLIENTS_PER_ROUND, population)}",
        "partition=dirichlet",
        f"partition.alpha={DIRICHLET_ALPHA}",
        f"partition.min_partition_size={min_partition_size}",
        f"local_steps={settings['local_steps']}",
        f"num_rounds={settings['rounds']}",
        f"eval.every={settings['rounds']}",
        "eval.grid_size=4",
        "eval.ddim_steps=5",
        *STRATEGIES[strategy],
        f"hydra.run.dir={run_dir}",
    ]
    if client_state != "memory":  # the key is newer than this benchmark's first version
        overrides += [f"client_state={client_state}", f"client_state_dir={run_dir / 'client_state'}"]
    return overrides


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def measure_scale_run(
    population: int, strategy: str, settings: dict[str, int], args: argparse.Namespace, min_size: int
) -> dict[str, Any]:
    """One scale run: its timings, peak memory and metrics rows."""
    name = f"{strategy}_{population}"
    run_dir = args.work / name
    overrides = scale_overrides(
        population, strategy, settings, args.data_root, run_dir, min_size, args.client_state
    )
    print(f"[scale] {name}: {' '.join(overrides)}", flush=True)
    load_before = os.getloadavg()
    run = run_feddm(overrides, args.work / f"{name}.log", args.timeout)
    rows = read_metrics(run_dir)
    result = {
        "population": population,
        "strategy": strategy,
        "overrides": overrides,
        "min_partition_size": min_size,
        "returncode": run.returncode,
        "timed_out": run.timed_out,
        "wall_s": run.wall_s,
        **round_timings(run.timed_lines),
        **run.memory,
        "train_time_s": [r.get("train_time_s") for r in rows],
        "sampled_partitions": [r.get("sampled_partitions") for r in rows],
        "eval_partitions": [r.get("eval_partitions") for r in rows if "eval_partitions" in r],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    if args.client_state != "memory":
        result["client_state_bytes"] = disk_bytes(run_dir / "client_state")
    if run.returncode != 0 or len(rows) != settings["rounds"]:
        result["error"] = output_tail(run)
        print(f"[scale] {name} FAILED (exit {run.returncode}):\n{result['error']}", flush=True)
    else:
        print(f"[scale] {name}: {summary_line(result)}", flush=True)
    return result


def summary_line(r: dict[str, Any]) -> str:
    return (
        f"start-up {fmt(r['startup_s'])} s, round 1 {fmt(r['first_round_s'])} s, later rounds "
        f"{fmt(r['later_rounds_mean_s'])} s, wall {fmt(r['wall_s'])} s, peak PSS {fmt(r['peak_pss_gib'], 2)} "
        f"GiB, peak RSS {fmt(r['peak_rss_gib'], 2)} GiB, {r['peak_processes']} processes; memory sampled every "
        f"{fmt(r['mean_sample_interval_s'], 2)} s on average ({fmt(r['sampler_cpu_s'])} s of CPU)"
    )


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def round_ratios(runs: dict[str, dict[str, Any]], populations: list[int], strategies: list[str]) -> dict:
    """Mean seconds of rounds 2..N at each population over the smallest population's, per strategy."""
    base_population = min(populations)
    ratios: dict[str, dict[str, float | None]] = {}
    for strategy in strategies:
        base = runs.get(f"{strategy}_{base_population}", {}).get("later_rounds_mean_s")
        ratios[strategy] = {}
        for population in populations:
            later = runs.get(f"{strategy}_{population}", {}).get("later_rounds_mean_s")
            ratios[strategy][str(population)] = later / base if later and base else None
    return ratios


# --- Client state cost per client ---


def state_cost_overrides(
    model: str, strategy: str, data_root: Path, run_dir: Path, state_dir: Path
) -> list[str]:
    """2 clients, 1 round of 1 step at batch 2, client state on disk in ``state_dir``."""
    return [
        *base_overrides(data_root),
        f"model={model}",
        "num_clients=2",
        "num_rounds=1",
        "local_steps=1",
        "batch_size=2",
        "eval.grid_size=1",
        "eval.ddim_steps=1",
        *STRATEGIES[strategy],
        "client_state=disk",
        f"client_state_dir={state_dir}",
        f"hydra.run.dir={run_dir}",
    ]


def client_state_files(state_dir: Path) -> list[Path]:
    """Each client's newest state file: ``STATE_DIR/run-KEY/partition-PID/round-R.safetensors``."""
    from client_app.state import round_files

    newest = []
    for folder in sorted(state_dir.glob("run-*/partition-*")):
        files = round_files(folder)
        if files:
            newest.append(files[max(files)])
    return newest


def describe_state_files(paths: list[Path]) -> dict[str, Any]:
    """Mean bytes, tensors and values per client file, and the bytes of ``PROJECTED_CLIENTS`` clients."""
    from safetensors import safe_open

    sizes, tensors, values = [], [], []
    for path in paths:
        sizes.append(os.path.getsize(path))
        with safe_open(str(path), framework="numpy") as state:
            names = list(state.keys())
            count = 0
            for name in names:
                shape = state.get_slice(name).get_shape()
                count += math.prod(shape)
        tensors.append(len(names))
        values.append(count)
    mean_bytes = sum(sizes) / len(sizes)
    return {
        "files": [str(p) for p in paths],
        "clients_with_state": len(paths),
        "mean_bytes": mean_bytes,
        "mean_tensors": sum(tensors) / len(tensors),
        "mean_values": sum(values) / len(values),
        f"projected_gib_{PROJECTED_CLIENTS}_clients": mean_bytes * PROJECTED_CLIENTS / 2**30,
    }


def measure_state_cost(model: str, strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    """One small run with the client state on disk; the size of what each client kept."""
    name = f"state_{model}_{strategy}"
    run_dir, state_dir = args.work / name, args.work / name / "client_state"
    overrides = state_cost_overrides(model, strategy, args.data_root, run_dir, state_dir)
    print(f"[state cost] {name}: {' '.join(overrides)}", flush=True)
    run = run_feddm(overrides, args.work / f"{name}.log", args.timeout)
    result: dict[str, Any] = {"model": model, "strategy": strategy, "overrides": overrides}
    result.update(returncode=run.returncode, wall_s=run.wall_s)
    paths = client_state_files(state_dir)
    if run.returncode != 0 or not paths:
        result["error"] = output_tail(run) + (
            f"\nno client state file under {state_dir}" if not paths else ""
        )
        print(f"[state cost] {name} FAILED (exit {run.returncode}):\n{result['error']}", flush=True)
        return result
    result.update(describe_state_files(paths))
    print(
        f"[state cost] {name}: {result['mean_bytes'] / 2**20:.2f} MiB in {result['mean_tensors']:.0f} tensors "
        f"per client, x{PROJECTED_CLIENTS}: {result[f'projected_gib_{PROJECTED_CLIENTS}_clients']:.2f} GiB",
        flush=True,
    )
    return result


# --- Tables, notes, main ---


def scale_table(runs: dict[str, dict[str, Any]], ratios: dict) -> str:
    header = [
        "strategy",
        "clients",
        "min partition size",
        "start-up s",
        "round 1 s",
        "rounds 2.. mean s",
        "vs smallest population",
        "train_time_s per round",
        "peak PSS GiB",
        "peak RSS GiB",
        "processes",
        "wall s",
    ]
    rows = []
    for r in runs.values():
        ratio = ratios.get(r["strategy"], {}).get(str(r["population"]))
        rows.append(
            [
                r["strategy"],
                r["population"],
                r["min_partition_size"],
                fmt(r["startup_s"]),
                fmt(r["first_round_s"]),
                fmt(r["later_rounds_mean_s"]),
                fmt(ratio, 2),
                " / ".join(fmt(t) for t in r["train_time_s"]) or "-",
                fmt(r["peak_pss_gib"], 2),
                fmt(r["peak_rss_gib"], 2),
                r["peak_processes"],
                fmt(r["wall_s"]) + (" (FAILED)" if "error" in r else ""),
            ]
        )
    return markdown_table(header, rows)


def state_cost_table(costs: dict[str, dict[str, Any]]) -> str:
    header = [
        "model",
        "strategy",
        "clients with a file",
        "MiB per client",
        "tensors",
        f"GiB x{PROJECTED_CLIENTS}",
    ]
    rows = []
    for c in costs.values():
        if "error" in c:
            rows.append([c["model"], c["strategy"], "FAILED", "-", "-", "-"])
            continue
        projected = c[f"projected_gib_{PROJECTED_CLIENTS}_clients"]
        rows.append(
            [
                c["model"],
                c["strategy"],
                c["clients_with_state"],
                f"{c['mean_bytes'] / 2**20:.2f}",
                f"{c['mean_tensors']:.0f}",
                f"{projected:.2f}",
            ]
        )
    return markdown_table(header, rows)


def targets(runs: dict[str, dict[str, Any]], ratios: dict, populations: list[int]) -> dict[str, Any]:
    """The issue's two targets at the largest population (met only if measured)."""
    largest = max(populations)
    at_largest = [r for r in runs.values() if r["population"] == largest and "error" not in r]
    worst_ratio = max((v for s in ratios.values() if (v := s.get(str(largest))) is not None), default=None)
    worst_pss = max((r["peak_pss_gib"] for r in at_largest), default=None)
    return {
        "population": largest,
        "round_ratio_target": TARGET_ROUND_RATIO,
        "worst_round_ratio": worst_ratio,
        "round_ratio_met": worst_ratio is not None and worst_ratio <= TARGET_ROUND_RATIO,
        "peak_pss_target_gib": TARGET_PEAK_PSS_GIB,
        "worst_peak_pss_gib": worst_pss,
        "peak_pss_met": worst_pss is not None and worst_pss < TARGET_PEAK_PSS_GIB,
    }


def scale_notes(settings: dict[str, int], client_state: str, goal: dict[str, Any], runs: dict) -> str:
    lowered = sorted({(r["population"], r["min_partition_size"]) for r in runs.values()})
    lines = [
        f"Tiny UNet, Fashion-MNIST, Dirichlet alpha {DIRICHLET_ALPHA}, {CLIENTS_PER_ROUND} clients per round "
        f"({EVAL_CLIENTS_PER_ROUND} evaluate in the last round), {settings['local_steps']} local steps, "
        f"{settings['rounds']} rounds, no FID; client state in {client_state}. Seconds per round from the "
        "run's Flower log lines as they arrived; peak memory summed over the run's whole process tree "
        f"(sampled every {SAMPLE_INTERVAL_S} s, less often when a sample costs more than "
        f"{SAMPLER_MAX_CPU_SHARE:.0%} of a core: see `mean_sample_interval_s`). `train_time_s` is the "
        "training phase from metrics.jsonl.",
        "",
        "Dirichlet `partition.min_partition_size` used (population: size): "
        + ", ".join(f"{p}: {s}" for p, s in lowered)
        + f" (the schema's default is {MIN_PARTITION_SIZES[0]}; lowered where flwr-datasets found no split).",
        "",
    ]
    largest = goal["population"]
    ratio, pss = goal["worst_round_ratio"], goal["worst_peak_pss_gib"]
    lines.append(
        f"- seconds per round (rounds 2..{settings['rounds']}) at {largest} clients vs the smallest population, "
        f"worst strategy: {fmt(ratio, 2)}x (target <= {TARGET_ROUND_RATIO}: "
        f"{'met' if goal['round_ratio_met'] else 'missed' if ratio is not None else 'not measured'})"
    )
    lines.append(
        f"- peak PSS at {largest} clients, worst strategy: {fmt(pss, 2)} GiB (target < {TARGET_PEAK_PSS_GIB}: "
        f"{'met' if goal['peak_pss_met'] else 'missed' if pss is not None else 'not measured'})"
    )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="issue #17's scale: 5 local steps, 3 rounds")
    parser.add_argument("--populations", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--rounds", type=int, help="override the scale's number of rounds")
    parser.add_argument("--local-steps", type=int, help="override the scale's local steps")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "benchmarks" / "scale")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--client-state", choices=("memory", "disk"), default="memory")
    parser.add_argument(
        "--state-cost",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the client state cost per client (default: in the full run, not with --quick)",
    )
    parser.add_argument("--state-cost-only", action="store_true", help="only the client state cost")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is stopped")
    parser.add_argument("--no-write", action="store_true", help="print the results, write no results files")
    args = parser.parse_args()
    args.work, args.data_root = args.work.resolve(), args.data_root.resolve()
    if args.state_cost is None:
        args.state_cost = args.state_cost_only or not args.quick
    return args


def main() -> None:
    args = parse_args()
    scale = "quick" if args.quick else "full"
    settings = dict(SCALES[scale])
    settings["rounds"] = args.rounds or settings["rounds"]
    settings["local_steps"] = args.local_steps or settings["local_steps"]
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"scale": scale, "settings": settings, "client_state": args.client_state}
    tables, notes = [], []
    if not args.state_cost_only:
        runs: dict[str, dict[str, Any]] = {}
        for population in args.populations:
            min_size = dirichlet_min_partition_size(population, args.data_root)
            for strategy in args.strategies:
                runs[f"{strategy}_{population}"] = measure_scale_run(
                    population, strategy, settings, args, min_size
                )
        ratios = round_ratios(runs, args.populations, args.strategies)
        goal = targets(runs, ratios, args.populations)
        results.update(runs=runs, round_ratios=ratios, targets=goal, clients_per_round=CLIENTS_PER_ROUND)
        tables.append(scale_table(runs, ratios))
        notes.append(scale_notes(settings, args.client_state, goal, runs))
    if args.state_cost:
        costs = {
            f"{model}_{strategy}": measure_state_cost(model, strategy, args)
            for model in STATE_COST_MODELS
            for strategy in STATE_COST_STRATEGIES
        }
        results["state_cost"] = costs
        tables.append("## Client state cost per client\n\n" + state_cost_table(costs))
        notes.append(
            f"Client state cost: 2 clients x 1 round of 1 step (batch 2) with `client_state=disk`; the mean size "
            f"of the clients' `partition-PID.safetensors` files and its projection to {PROJECTED_CLIENTS} clients."
        )
    table, note = "\n\n".join(tables), "\n\n".join(notes)
    if not args.no_write:
        print(write_results("scale", results, table, note))
    print(table)
    print(note)


if __name__ == "__main__":
    main()
