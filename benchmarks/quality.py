"""Image quality under non-IID data: centralized vs FedDM's strategies, or vs server aggregators.

    python benchmarks/quality.py --quick          # 2 CPU cores, under an hour
    python benchmarks/quality.py                  # full scale, for a GPU machine
    python benchmarks/quality.py --quick --suite aggregators   # FedAvgM, FedAdam (+ int8)
    python benchmarks/quality.py --quick --suite compression   # 4-, 2-, 1-bit codes, top-k, downlink

Three suites: ``strategies`` (FedDM-vanilla, -prox, -quant, partial exchange,
FedDDPM), ``aggregators`` (server optimizers: a small sweep of FedAvgM's and
FedAdam's settings under IID, the chosen ones also under Dirichlet 0.1 and with
int8 codes) and ``compression`` (packed 4-, 2- and 1-bit codes with error
feedback, top-k 1 % and 10 % with int8 values, alone and with partial USplit
4-way, on the FID vs cumulative bytes frontier, uplink and uplink + downlink).
Each suite runs its own centralized and vanilla baselines, so its ratios are
measured side by side on one machine.

Fashion-MNIST, 4 clients, IID and Dirichlet alpha = 0.1 partitions. Every run
trains for the same total number of steps: the federated runs do R rounds of S
local steps on each of the 4 clients; the centralized run is the same app with
one client that holds the whole training set and does 4 x S steps per round
(same model, optimizer, EMA and evaluation code, no federation). FID is
torchmetrics' with the standard Inception weights, on ``--num-samples``
generated images against as many test images, at every evaluation round, and
KID (unbiased, so not inflated by the small sample as FID is) from the same features.

Each run is a ``feddm-run`` process with its own run folder under ``--work``;
the script collects their ``metrics.jsonl``, writes
``benchmarks/results/quality[_quick].{json,md}`` and a plot of FID vs round and
vs cumulative uplink bytes (``quality[_quick].png``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, cpu_model, markdown_table, write_results  # noqa: E402

NUM_CLIENTS = 4
PARTITIONS = {"iid": ["partition=iid"], "dirichlet-0.1": ["partition=dirichlet", "partition.alpha=0.1"]}
# Federated methods: their overrides and the partitions they run on; "centralized" is
# the one-client baseline. Clients with local parts (udec, ulatdec) each generate
# a quarter of the FID images, so the pooled FID uses as many images as the others.
BOTH, NON_IID = tuple(PARTITIONS), ("dirichlet-0.1",)
METHODS = {
    "vanilla": (["strategy=vanilla"], BOTH),
    "prox": (["strategy=prox"], BOTH),
    "quant": (["strategy=quant"], BOTH),
    "udec": (["strategy=partial", "strategy.preset=udec"], NON_IID),
    "udec+int8": (["strategy=partial", "strategy.preset=udec", "strategy.quantize=true"], NON_IID),
    "ulatdec": (["strategy=partial", "strategy.preset=ulatdec"], NON_IID),
    "ulatdec+int8": (["strategy=partial", "strategy.preset=ulatdec", "strategy.quantize=true"], NON_IID),
    "usplit": (["strategy=partial", "strategy.preset=usplit"], NON_IID),
    "usplit+int8": (["strategy=partial", "strategy.preset=usplit", "strategy.quantize=true"], NON_IID),
    "usplit4+int8": (
        ["strategy=partial", "strategy.preset=usplit", "strategy.split_ways=4", "strategy.quantize=true"],
        NON_IID,
    ),
    "fedddpm": (["strategy=fedddpm", "strategy.pretrain_steps={pretrain_steps}"], NON_IID),
    # Clients evaluate every eval_every rounds only; the training loss is there every round.
    "fedddpm_plus": (
        ["strategy=fedddpm_plus", "strategy.pretrain_steps={pretrain_steps}", "strategy.signal=train_loss"],
        NON_IID,
    ),
}
# Server optimizers (Reddi et al., ICLR 2021; Hsu et al. 2019). The sweep runs under IID;
# the settings it chose (the schema's defaults since) also run under Dirichlet 0.1 and with int8.
# Ordered by how much each point was expected to tell; a cut-short invocation runs the first.
FEDAVGM_SWEEP = [(1.0, 0.9), (2.0, 0.0), (1.0, 0.5)]  # (server learning rate, server momentum)
FEDADAM_SWEEP = [1e-2, 3e-3, 3e-2]  # eta (server learning rate); tau 1e-3, betas 0.9, 0.99
TUNED_FEDAVGM, TUNED_FEDADAM = (1.0, 0.9), 1e-2


def _fedavgm(lr: float, momentum: float) -> str:
    return f"fedavgm lr={lr:g} m={momentum:g}"


def _fedadam(eta: float) -> str:
    return f"fedadam eta={eta:g}"


AGGREGATOR_METHODS = {"vanilla": METHODS["vanilla"]}
for lr, momentum in FEDAVGM_SWEEP:
    overrides = [
        "aggregator=fedavgm",
        f"aggregator.server_learning_rate={lr}",
        f"aggregator.server_momentum={momentum}",
    ]
    tuned = (lr, momentum) == TUNED_FEDAVGM
    AGGREGATOR_METHODS[_fedavgm(lr, momentum)] = (overrides, BOTH if tuned else ("iid",))
    if tuned:
        AGGREGATOR_METHODS[_fedavgm(lr, momentum) + " +int8"] = (overrides + ["strategy=quant"], BOTH)
for eta in FEDADAM_SWEEP:
    overrides = ["aggregator=fedadam", f"aggregator.eta={eta}"]
    tuned = eta == TUNED_FEDADAM
    AGGREGATOR_METHODS[_fedadam(eta)] = (overrides, BOTH if tuned else ("iid",))
    if tuned:
        AGGREGATOR_METHODS[_fedadam(eta) + " +int8"] = (overrides + ["strategy=quant"], BOTH)
# Compression beyond int8 (#18): packed codes with error feedback, and with partial USplit 4-way.
_EF = ["strategy.error_feedback=true"]
_USPLIT4 = ["strategy=partial", "strategy.preset=usplit", "strategy.split_ways=4", "strategy.quantize=true"]
COMPRESSION_METHODS = {
    "vanilla": METHODS["vanilla"],
    "int4": (["strategy=quant", "strategy.bits=4", *_EF], BOTH),
    "int2": (["strategy=quant", "strategy.bits=2", *_EF], BOTH),
    "1bit": (["strategy=quant", "strategy.bits=1", *_EF], BOTH),
    "usplit4+int4": (_USPLIT4 + ["strategy.bits=4", *_EF], BOTH),
    "usplit4+1bit": (_USPLIT4 + ["strategy.bits=1", *_EF], BOTH),
    # Top-k always keeps what it did not send (error feedback); values as int8 codes.
    "topk1%+int8": (["strategy=quant", "strategy.topk=0.01"], BOTH),
    "topk10%+int8": (["strategy=quant", "strategy.topk=0.1"], BOTH),
    "usplit4+topk10%+int8": (_USPLIT4 + ["strategy.topk=0.1"], BOTH),
    # Both directions: the clients receive 8-bit codes of the change since their last round.
    "int4+int8_delta": (["strategy=quant", "strategy.bits=4", *_EF, "strategy.downlink=int8_delta"], BOTH),
}
SUITES = {"strategies": METHODS, "aggregators": AGGREGATOR_METHODS, "compression": COMPRESSION_METHODS}
SERVER_OPTIMIZERS = ("fedavgm", "fedadam")

PERSONALIZED = ("udec", "udec+int8", "ulatdec", "ulatdec+int8")
DEFAULT_FID_WEIGHTS = REPO.parent / "shared" / "weights" / "pt_inception-2015-12-05.torchscript.pt"

# Scales: --quick fits 2 CPU cores in under an hour (7 runs, two FIDs of 1000 images each);
# the full scale is for a GPU machine.
SCALES = {
    "quick": dict(
        model="tiny",
        rounds=8,
        local_steps=25,
        eval_every=4,
        num_samples=1000,
        ddim_steps=10,
        batch_size=32,
        pretrain_steps=100,
    ),
    "full": dict(
        model="fashion_mnist",
        rounds=20,
        local_steps=250,
        eval_every=5,
        num_samples=5000,
        ddim_steps=50,
        batch_size=64,
        pretrain_steps=1000,
    ),
}


@dataclass(frozen=True)
class Run:
    """One training run of the comparison."""

    method: str
    partition: str  # "-" for centralized: one client holds every image
    suite: str = "strategies"

    @property
    def name(self) -> str:
        return f"{self.method}_{self.partition}" if self.method != "centralized" else "centralized"


def plan(scale: dict, only: list[str] | None = None, suite: str = "strategies") -> list[Run]:
    """The runs: centralized once, each method of the suite under each of its partitions."""
    methods = SUITES[suite]
    runs = [Run("centralized", "-", suite)]
    runs += [
        Run(m, p, suite) for p in PARTITIONS for m, (_, partitions) in methods.items() if p in partitions
    ]
    unknown = set(only or ()) - {r.name for r in runs}
    if unknown:
        raise SystemExit(f"--only: unknown runs {sorted(unknown)}; choose from {[r.name for r in runs]}")
    return [r for r in runs if not only or r.name in only]


def run_overrides(
    run: Run, scale: dict, data_root: Path, fid_weights: Path | None, fid_cache: Path
) -> list[str]:
    """Hydra overrides of one run (what ``feddm-run`` gets)."""
    # Clients with local parts each generate a share of the FID images: the pooled
    # FID (fid_mixture) then uses as many images as the global model's.
    samples = scale["num_samples"] // (NUM_CLIENTS if run.method in PERSONALIZED else 1)
    common = [
        f"model={scale['model']}",
        f"num_rounds={scale['rounds']}",
        f"batch_size={scale['batch_size']}",
        f"eval.every={scale['eval_every']}",
        f"eval.num_samples={samples}",
        f"eval.ddim_steps={scale['ddim_steps']}",
        f"eval.fid_cache={fid_cache}",
        f"dataset.root={data_root}",
        "checkpoint_every=0",
        "seed=0",
    ]
    if fid_weights:
        common.append(f"eval.fid_weights={fid_weights}")
    if run.method == "centralized":
        return common + [
            "num_clients=1",
            "strategy=vanilla",
            "partition=iid",
            f"local_steps={NUM_CLIENTS * scale['local_steps']}",
        ]
    method = [o.format(**scale) for o in SUITES[run.suite][run.method][0]]
    return common + [
        f"num_clients={NUM_CLIENTS}",
        *method,
        f"local_steps={scale['local_steps']}",
        *PARTITIONS[run.partition],
    ]


def folder_name(run: Run) -> str:
    """``run.name`` as a folder name Hydra's override grammar accepts (no spaces, no ``=``)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", run.name)


def finished_outcome(run_dir: Path, overrides: list[str], rounds: int) -> dict | None:
    """The outcome of a run that an earlier, interrupted invocation finished in ``run_dir``, if any."""
    outcome = run_dir / "outcome.json"
    if outcome.is_file():
        return json.loads(outcome.read_text())
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    if not rows or rows[-1].get("round") != rounds or "fid" not in rows[-1]:
        return None
    # Finished before outcome.json existed: the run's own clock (training and evaluation, no start-up).
    wall_s = rows[-1]["wall_time_s"]
    return {"wall_s": wall_s, "rows": rows, "run_dir": str(run_dir), "overrides": overrides}


def execute(run: Run, overrides: list[str], work: Path, rounds: int) -> dict:
    """Run ``feddm-run`` (a fresh process) and return its metrics rows and wall time.

    A run that an earlier invocation finished in the same ``--work-dir`` is reused.
    """
    run_dir = work / folder_name(run)
    earlier = finished_outcome(run_dir, overrides, rounds)
    if earlier is not None:
        print(f"[{time.strftime('%H:%M:%S')}] {run.name}: finished earlier in {run_dir}", flush=True)
        return {**earlier, "reused": True}
    if (run_dir / "metrics.jsonl").is_file():
        raise FileExistsError(f"{run_dir} holds an unfinished run; remove it or pick another --work-dir")
    log = work / f"{folder_name(run)}.log"
    command = [str(Path(sys.executable).parent / "feddm-run"), *overrides, f"hydra.run.dir={run_dir}"]
    print(f"[{time.strftime('%H:%M:%S')}] {run.name}: {' '.join(overrides)}", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    wall_s = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{run.name} failed; see {log}:\n{log.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(
        f"    done in {wall_s:.0f} s: FID, KID "
        + ", ".join(f"r{r['round']} {r['fid']:.1f}, {r['kid']:.4f}" for r in rows if "fid" in r),
        flush=True,
    )
    outcome = {
        "wall_s": round(wall_s, 1),
        "rows": rows,
        "run_dir": str(run_dir),
        "overrides": overrides,
        "machine": cpu_model(),
    }
    (run_dir / "outcome.json").write_text(json.dumps(outcome))
    return outcome


def summarize(run: Run, outcome: dict) -> dict:
    """FID per evaluation round with the cumulative uplink bytes at that round."""
    cumulative, downlink, points = 0, 0, []
    for row in outcome["rows"]:
        cumulative += row.get("uplink_bytes", 0)
        downlink += row.get("downlink_bytes", 0)  # training messages (evaluation's are apart)
        if "fid" in row:
            # Clients with their own models: the pooled FID compares with a global model's;
            # the mean of the clients' FIDs (each on a quarter of the images) is kept beside it.
            point = {
                "round": row["round"],
                "fid": row.get("fid_mixture", row["fid"]),
                "kid": row.get("kid_mixture", row.get("kid")),
                "cumulative_uplink_bytes": cumulative,
                "cumulative_total_bytes": cumulative + downlink,
            }
            if "fid_mixture" in row:
                point["fid_mean_of_clients"] = row["fid"]
            points.append(point)
    return {
        "method": run.method,
        "partition": run.partition,
        "fid": points,
        "final_fid": points[-1]["fid"],
        "final_kid": points[-1]["kid"],
        "overrides": outcome["overrides"],
        "total_uplink_bytes": cumulative if run.method != "centralized" else 0,
        "total_downlink_bytes": downlink if run.method != "centralized" else 0,
        "wall_s": outcome["wall_s"],
        # Where the run ran (its wall time depends on it; its FID and bytes do not). A run
        # finished before outcome.json said so ran in this machine's work folder.
        "machine": outcome.get("machine") or cpu_model(),
    }


def merged_with_earlier(name: str, scale: dict, results: dict, suite: str) -> dict:
    """Earlier runs of the same scale (from ``results/NAME.json``) with this invocation's on top.

    So a comparison can be extended by ``--only`` without rerunning every method.
    """
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return results
    payload = json.loads(path.read_text())
    earlier = payload["results"]
    # Settings added since (e.g. pretrain_steps) do not change the earlier runs.
    if any(scale.get(k) != v for k, v in earlier.get("settings", {"-": None}).items()):
        print(f"{path} holds another scale's results; they are replaced", flush=True)
        return results
    merged = {k: v for k, v in earlier["runs"].items() if k not in results}
    for run in merged.values():  # written before runs said where they ran: the file's machine
        run.setdefault("machine", payload.get("machine", {}).get("cpu", "unknown"))
    merged.update(results)
    order = [r.name for r in plan(scale, suite=suite)]
    return dict(sorted(merged.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bytes, FID) points no other point beats on both, by increasing bytes."""
    frontier, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            frontier.append((x, y))
            best = y
    return frontier


def plot(results: dict, out: Path) -> None:
    """FID vs round and vs cumulative uplink, one row per partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    partitions = list(PARTITIONS)
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.get_cmap("tab20").colors)  # 12+ methods
    fig, axes = plt.subplots(len(partitions), 2, figsize=(11, 4 * len(partitions)), squeeze=False)
    central = results.get("centralized")
    for row, partition in enumerate(partitions):
        ax_round, ax_bytes = axes[row]
        if central:
            rounds = [p["round"] for p in central["fid"]]
            ax_round.plot(rounds, [p["fid"] for p in central["fid"]], "k--", marker="o", label="centralized")
            ax_bytes.axhline(
                central["final_fid"], color="k", linestyle="--", label="centralized (final, no uplink)"
            )
        finals = []
        for r in results.values():
            if r["partition"] != partition:
                continue
            ax_round.plot(
                [p["round"] for p in r["fid"]], [p["fid"] for p in r["fid"]], marker="o", label=r["method"]
            )
            ax_bytes.plot(
                [p["cumulative_uplink_bytes"] / 1e6 for p in r["fid"]],
                [p["fid"] for p in r["fid"]],
                marker="o",
                label=r["method"],
            )
            finals.append((r["total_uplink_bytes"] / 1e6, r["final_fid"]))
        frontier = pareto_frontier(finals)
        if len(frontier) > 1:
            ax_bytes.step(
                *zip(*frontier), where="post", color="grey", alpha=0.6, linewidth=3, label="frontier (final)"
            )
        ax_round.set(
            title=f"FID vs round ({partition})", xlabel="round (equal steps for every method)", ylabel="FID"
        )
        ax_bytes.set(
            title=f"FID vs cumulative uplink ({partition})",
            xlabel="uplink MB, all clients (log)",
            ylabel="FID",
        )
        ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_bytes.set_xscale("log")
        for ax in (ax_round, ax_bytes):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def aggregator_target(results: dict) -> str:
    """Whether a server optimizer reaches FID <= 1.15x centralized (IID) and beats vanilla (Dirichlet 0.1)."""
    central, vanilla = results.get("centralized"), results.get("vanilla_dirichlet-0.1")
    optimizers = [r for r in results.values() if r["method"].startswith(SERVER_OPTIMIZERS)]
    iid = [r for r in optimizers if r["partition"] == "iid"]
    non_iid = [r for r in optimizers if r["partition"] == "dirichlet-0.1"]
    if not (central and vanilla and iid and non_iid):
        return "not measured yet (needs centralized, vanilla and server-optimizer runs under both partitions)"
    best_iid = min(iid, key=lambda r: r["final_fid"])
    best_non_iid = min(non_iid, key=lambda r: r["final_fid"])
    iid_ratio = best_iid["final_fid"] / central["final_fid"]
    beats = best_non_iid["final_fid"] < vanilla["final_fid"]
    return (
        f"FID <= 1.15x centralized under IID: {'met' if iid_ratio <= 1.15 else 'missed'} (best: "
        f"{best_iid['method']}, {iid_ratio:.2f}x); beats vanilla under Dirichlet 0.1: "
        f"{'met' if beats else 'missed'} (best: {best_non_iid['method']}, FID {best_non_iid['final_fid']:.1f} "
        f"vs {vanilla['final_fid']:.1f})"
    )


def aggregator_notes(results: dict, scale: dict) -> str:
    """What the aggregators suite ran (the sweep so far, the chosen settings), what it did not, and its target."""
    swept = [
        r["method"]
        for r in results.values()
        if r["partition"] == "iid"
        and r["method"].startswith(SERVER_OPTIMIZERS)
        and "+int8" not in r["method"]
    ]
    missing = [run.name for run in plan(scale, suite="aggregators") if run.name not in results]
    return (
        "Server optimizers aggregate the clients' mean update (pseudo-gradient) with Flower's FedAvgM "
        "(lr: server learning rate, m: server momentum) and FedAdam (eta: server learning rate; tau 1e-3, "
        f"betas 0.9 and 0.99). Sweep under IID, run so far: {', '.join(swept) or 'none'}. The chosen "
        f"settings ({_fedavgm(*TUNED_FEDAVGM)}, {_fedadam(TUNED_FEDADAM)}) also run under Dirichlet 0.1 and "
        "with int8 codes (+int8: strategy=quant). "
        + (f"Planned but not run yet: {', '.join(missing)}. " if missing else "")
        + "Target (server optimizers): "
        + aggregator_target(results)
        + "."
    )


def _vs_vanilla(results: dict, r: dict, key: str) -> float | None:
    """How many times fewer bytes (``key``: a ``total_*_bytes``) run ``r`` sent than vanilla."""
    vanilla = results.get(f"vanilla_{r['partition']}")
    return vanilla[key] / r[key] if vanilla and r.get(key) and vanilla.get(key) else None


def compression_notes(results: dict) -> str:
    """Both directions' savings per run, and #18's targets (4-bit; >= 30x at FID <= 1.1x vanilla)."""
    lines, four_bit, thirty, delta = [], [], [], []
    for r in results.values():
        vanilla = results.get(f"vanilla_{r['partition']}")
        up, down = (
            _vs_vanilla(results, r, "total_uplink_bytes"),
            _vs_vanilla(results, r, "total_downlink_bytes"),
        )
        if not (vanilla and up) or r["method"] == "vanilla":
            continue
        fid = r["final_fid"] / vanilla["final_fid"]
        total = (vanilla["total_uplink_bytes"] + vanilla["total_downlink_bytes"]) / (
            r["total_uplink_bytes"] + r["total_downlink_bytes"]
        )
        lines.append(
            f"- {r['method']} ({r['partition']}): uplink {up:.3f}x fewer bytes, downlink "
            f"{down or 1:.2f}x, both {total:.2f}x; FID {fid:.3f}x vanilla's"
        )
        entry = f"{r['method']} ({r['partition']}: {up:.3f}x, FID {fid:.3f}x)"
        if r["method"] == "int4":
            four_bit.append(("met" if up >= 7.5 and fid <= 1.05 else "missed") + f": {entry}")
        if up >= 30 and fid <= 1.1:
            thirty.append(entry)
        if r["method"].endswith("int8_delta") and down:
            delta.append(
                ("met" if down >= 3.9 else "missed")
                + f": {r['method']} ({r['partition']}: downlink {down:.2f}x, FID {fid:.3f}x)"
            )
    return (
        "Savings against FedDM-vanilla under the same partition (uplink: the clients' replies; downlink: the "
        "training messages):\n\n"
        + "\n".join(lines)
        + "\n\nTargets: 4-bit >= 7.5x fewer uplink bytes at FID <= 1.05x vanilla's: "
        + ("; ".join(four_bit) or "not measured yet")
        + ". Some configuration >= 30x fewer uplink bytes at FID <= 1.1x vanilla's: "
        + ("met by " + "; ".join(thirty) if thirty else "not met by any configuration run so far")
        + ". Downlink >= 3.9x fewer bytes with int8_delta: "
        + ("; ".join(delta) or "not measured yet")
        + "."
    )


def machine_notes(results: dict) -> str:
    """Which machine ran which run, when they were not all run on one."""
    by_machine: dict[str, list[str]] = {}
    for name, r in results.items():
        by_machine.setdefault(r.get("machine", "unknown"), []).append(name)
    if len(by_machine) < 2:
        return ""
    vanillas = [
        f"{name} on {results[name].get('machine', 'unknown')}"
        for name in results
        if name.startswith("vanilla_")
    ]
    return (
        "Runs come from more than one machine: "
        + "; ".join(f"{m}: {', '.join(names)}" for m, names in by_machine.items())
        + ". FID, KID and bytes do not depend on the machine's speed (wall s does); each ratio to vanilla "
        "compares with the vanilla run of the same partition (" + ", ".join(vanillas) + ")."
    )


def report(results: dict, scale_name: str, scale: dict, suite: str = "strategies") -> tuple[str, str]:
    """The Markdown table and notes."""
    central = results.get("centralized", {}).get("final_fid")
    central_kid = results.get("centralized", {}).get("final_kid")
    rows, frontier_hits = [], []
    for r in results.values():
        vanilla = results.get(f"vanilla_{r['partition']}")
        byte_ratio = (
            vanilla["total_uplink_bytes"] / r["total_uplink_bytes"]
            if vanilla and r["total_uplink_bytes"]
            else None
        )
        fid_vs_vanilla = r["final_fid"] / vanilla["final_fid"] if vanilla else None
        if byte_ratio and fid_vs_vanilla and byte_ratio >= 12 and fid_vs_vanilla <= 1.1:
            frontier_hits.append(
                f"{r['method']} ({r['partition']}: {byte_ratio:.1f}x fewer bytes, FID {fid_vs_vanilla:.2f}x vanilla's)"
            )
        rows.append(
            [
                r["method"],
                r["partition"],
                " / ".join(f"{p['fid']:.1f}" for p in r["fid"])
                + (
                    f" (mean of clients {r['fid'][-1]['fid_mean_of_clients']:.1f})"
                    if "fid_mean_of_clients" in r["fid"][-1]
                    else ""
                ),
                f"{r['final_fid'] / central:.2f}" if central else "-",
                f"{fid_vs_vanilla:.2f}" if fid_vs_vanilla else "-",
                f"{r['final_kid'] * 1e3:.1f}" if r.get("final_kid") is not None else "-",
                f"{r['final_kid'] / central_kid:.2f}"
                if central_kid and r.get("final_kid") is not None
                else "-",
                f"{r['total_uplink_bytes'] / 1e6:.1f}" if r["total_uplink_bytes"] else "0 (no federation)",
                f"{byte_ratio:.2f}x" if byte_ratio else "-",
                f"{r['wall_s']:.0f}",
                r.get("machine", "-"),
            ]
        )
    evals = ", ".join(str(p["round"]) for p in next(iter(results.values()))["fid"])
    table = markdown_table(
        [
            "method",
            "partition",
            f"FID at rounds {evals}",
            "final FID / centralized",
            "final FID / vanilla",
            "final KID x 1000",
            "final KID / centralized",
            "uplink MB (all clients)",
            "uplink saved vs vanilla",
            "wall s",
            "machine",
        ],
        rows,
    )
    steps = scale["rounds"] * NUM_CLIENTS * scale["local_steps"]
    notes = (
        f"Scale `{scale_name}`: model `{scale['model']}`, {NUM_CLIENTS} clients, {scale['rounds']} rounds x "
        f"{scale['local_steps']} local steps per client (centralized: 1 client, {NUM_CLIENTS * scale['local_steps']} "
        f"steps per round), {steps} training steps per run at batch {scale['batch_size']}; FID of the EMA model on "
        f"{scale['num_samples']} DDIM-{scale['ddim_steps']} samples against {scale['num_samples']} test images "
        "(standard Inception weights) every "
        f"{scale['eval_every']} rounds, and KID from the same features. "
        f"Plot: `{result_name(suite, scale_name)}.png`.\n\n"
    )
    if machine_notes(results):
        notes += machine_notes(results) + "\n\n"
    if suite == "aggregators":
        notes += aggregator_notes(results, scale)
        return table, notes
    if suite == "compression":
        notes += compression_notes(results)
        return table, notes
    notes += (
        "Clients that keep parts of the model (udec, ulatdec) have a model each: their FID is that of the "
        f"images of all clients pooled ({scale['num_samples'] // NUM_CLIENTS} from each), with the mean of the "
        "clients' own FIDs (on their share of the images, so biased upwards) in brackets. FedDDPM and FedDDPM+ "
        f"add {scale['pretrain_steps']} local pretraining steps per client and the server's calibration steps "
        "to the training budget; their uplink includes the one upload of every local model.\n\n"
        "Target (partial exchange, FedDDPM): some configuration sends >= 12x fewer uplink bytes than "
        "FedDM-vanilla at a final FID <= 1.1x vanilla's: "
        + ("; ".join(frontier_hits) if frontier_hits else "not met by any configuration run so far")
        + "."
    )
    return table, notes


def result_name(suite: str, scale_name: str) -> str:
    """``quality[_aggregators][_quick]``: the results file of a suite and scale."""
    return (
        "quality"
        + ("" if suite == "strategies" else f"_{suite}")
        + ("_quick" if scale_name == "quick" else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 2-CPU-core scale (under an hour)")
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / "outputs" / "benchmarks" / "quality",
        help="folder for the run folders and logs (a new subfolder per invocation)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="an earlier invocation's folder: its finished runs are reused, the others run there",
    )
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--fid-weights",
        type=Path,
        default=DEFAULT_FID_WEIGHTS if DEFAULT_FID_WEIGHTS.is_file() else None,
        help="TorchScript FID Inception network; without it torchmetrics downloads the standard one",
    )
    parser.add_argument(
        "--suite", choices=list(SUITES), default="strategies", help="which methods to compare"
    )
    parser.add_argument("--only", nargs="+", help="run only these (e.g. centralized vanilla_iid)")
    for key in SCALES["quick"]:
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=type(SCALES["quick"][key]), help="override the scale"
        )
    args = parser.parse_args()
    scale_name = "quick" if args.quick else "full"
    scale = dict(SCALES[scale_name])
    scale.update({k: v for k, v in vars(args).items() if k in scale and v is not None})

    work = (args.work_dir or args.work / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    fid_cache = args.work.resolve() / "fid_cache"  # real statistics, shared by invocations
    results, reused, started = {}, [], time.perf_counter()
    for run in plan(scale, args.only, args.suite):
        overrides = run_overrides(
            run,
            scale,
            args.data_root.resolve(),
            args.fid_weights.resolve() if args.fid_weights else None,
            fid_cache,
        )
        outcome = execute(run, overrides, work, scale["rounds"])
        if outcome.get("reused"):
            reused.append(run.name)
        results[run.name] = summarize(run, outcome)
    total_s = time.perf_counter() - started

    name = result_name(args.suite, scale_name)
    results = merged_with_earlier(name, scale, results, args.suite)
    plot(results, RESULTS / f"{name}.png")
    table, notes = report(results, scale_name, scale, args.suite)
    ran = len(plan(scale, args.only, args.suite)) - len(reused)
    notes += (
        f"\n\nThis invocation ran {ran} of the {len(results)} runs in {total_s / 60:.1f} minutes on this machine"
        + (f" and reported {len(reused)} it had finished earlier ({', '.join(reused)})" if reused else "")
        + f" (run folders: `{work}`)."
    )
    print(
        write_results(
            name,
            {
                "scale": scale_name,
                "settings": scale,
                "runs": results,
                "last_invocation_minutes": round(total_s / 60, 1),
            },
            table,
            notes,
        )
    )
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
