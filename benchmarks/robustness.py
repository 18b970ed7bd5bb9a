"""Robust aggregation under attack: FedAvg vs each robust aggregator with 0, 1 and 2 of 8 clients attacking.

    python benchmarks/robustness.py --quick       # 2 CPU cores, about 30-40 minutes
    python benchmarks/robustness.py               # full scale, for a GPU machine

Fashion-MNIST, 8 clients, IID partition, FedDM-vanilla (full-weight replies).
The attacks are ``feddm.attacks``: a client that claims 1e300 examples and sends
zeros (``claim_examples``), one that sends w_global + 100 Δ (``scale_update``),
one that sends w_global − Δ (``flip_update``), Δ being its honest update. The
attackers are partitions 0 (1 attacker) or 0 and 1 (2 attackers); they attack in
every round. Each aggregator runs once clean and once per attack and attacker
count; the reply checks (``max_num_examples``, ``max_update_norm_ratio``) stay at
their defaults. If the config has ``max_update_norm_ratio``, FedAvg also runs
with the checks off (``max_update_norm_ratio=null``, ``max_num_examples`` 10^301)
so the table shows what the aggregator alone does.

Runs are in-process: ``server_app.federation.run_federation`` over a
``feddm.local_grid.LocalGrid`` that calls the real ClientApp functions, wrapped
by ``feddm.attacks.attacking_client``. Per run: the clients' final held-out loss
(``eval_loss`` in metrics.jsonl), the FID and KID of the final global model (EMA
off: the model the clients evaluated) from the run's own evaluation, whether the
saved global model is finite, and the replies the checks left out. Ratios are
to the clean FedAvg run. Writes ``benchmarks/results/robustness.{json,md,png}``;
runs of the same scale recorded earlier are kept unless this invocation redid them
(so ``--only`` fills in or redoes single rows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, markdown_table, write_results  # noqa: E402

NUM_CLIENTS = 8
ATTACKER_COUNTS = (1, 2)
DEFAULT_FID_WEIGHTS = REPO.parent / "shared" / "weights" / "pt_inception-2015-12-05.torchscript.pt"
# Krum and Multi-Krum assume f = 2 of 8 malicious (n >= 2f + 3 = 7). Bulyan needs n >= 4f + 3,
# 11 clients for f = 2: with 8 clients it runs with f = 1 (n >= 7).
AGGREGATORS = {
    "fedavg": ["aggregator=fedavg"],
    "median": ["aggregator=median"],
    "trimmed_mean": ["aggregator=trimmed_mean", "aggregator.beta=0.25"],
    "krum": ["aggregator=krum", "aggregator.num_malicious_nodes=2"],
    "multikrum": [
        "aggregator=multikrum",
        "aggregator.num_malicious_nodes=2",
        "aggregator.num_nodes_to_select=4",
    ],
    "bulyan": ["aggregator=bulyan", "aggregator.num_malicious_nodes=1"],
}
ROBUST = ("median", "trimmed_mean", "krum", "multikrum", "bulyan")
CHECKS_OFF = ["max_update_norm_ratio=null", f"max_num_examples={10**301}"]
SCALES = {
    # A micro UNet (tests/conftest.py's MICRO_MODEL: channels 8, 16): on a shared 2-core machine a `tiny`
    # step took 0.6 s and 64 Inception images 12 s, so the quick scale keeps both small.
    "quick": dict(
        model="micro",
        rounds=3,
        local_steps=10,
        batch_size=16,
        num_samples=96,
        ddim_steps=10,
        client_eval_max_examples=64,
    ),
    "full": dict(
        model="tiny",
        rounds=20,
        local_steps=100,
        batch_size=64,
        num_samples=5000,
        ddim_steps=50,
        client_eval_max_examples=256,
    ),
}


def plan() -> list[dict]:
    """The runs, FedAvg's first: per aggregator clean, then each attack with 1 and 2 attackers."""
    from feddm.attacks import ATTACKS

    runs = []
    variants = [("on", []), ("off", CHECKS_OFF)]
    for aggregator in AGGREGATORS:
        for checks, extra in variants:
            if checks == "off" and aggregator != "fedavg":
                continue
            runs.append(dict(aggregator=aggregator, checks=checks, attack="none", attackers=0, extra=extra))
            for attack in ATTACKS:
                for count in ATTACKER_COUNTS:
                    runs.append(
                        dict(
                            aggregator=aggregator, checks=checks, attack=attack, attackers=count, extra=extra
                        )
                    )
    return sorted(runs, key=priority)


def priority(run: dict) -> tuple:
    """Most telling first, so a cut-short invocation has them: FedAvg clean, 2 attackers, then the rest."""
    order = ["fedavg", "median", "trimmed_mean", "krum", "fedavg-off", "multikrum", "bulyan"]
    key = run["aggregator"] + ("-off" if run["checks"] == "off" else "")
    clean_fedavg = run["attackers"] == 0 and key == "fedavg"
    tier = 0 if clean_fedavg else 1 if run["attackers"] == 2 else 2 if run["attackers"] == 0 else 3
    return (tier, order.index(key))


def run_name(run: dict) -> str:
    checks = "" if run["checks"] == "on" else "_checks-off"
    return f"{run['aggregator']}{checks}_{run['attack']}_{run['attackers']}"


MICRO_MODEL = [
    "model=tiny",
    "model.unet.block_out_channels=[8,16]",
    "model.unet.norm_num_groups=4",
    "model.unet.attention_head_dim=4",
]


def overrides(
    run: dict, scale: dict, data_root: Path, fid_weights: Path | None, fid_cache: Path
) -> list[str]:
    model = MICRO_MODEL if scale["model"] == "micro" else [f"model={scale['model']}"]
    common = [
        *model,
        "strategy=vanilla",
        "partition=iid",
        f"num_clients={NUM_CLIENTS}",
        f"num_rounds={scale['rounds']}",
        f"local_steps={scale['local_steps']}",
        f"batch_size={scale['batch_size']}",
        f"client_eval_max_examples={scale['client_eval_max_examples']}",
        f"eval.every={scale['rounds']}",  # clients' loss, grid and FID after the last round only
        f"eval.num_samples={scale['num_samples']}",
        f"eval.ddim_steps={scale['ddim_steps']}",
        f"eval.fid_cache={fid_cache}",
        "eval.grid_size=16",
        "ema.enabled=false",
        f"dataset.root={data_root}",
        "dataset.download=false",
        "checkpoint_every=0",
        "seed=0",
    ]
    if fid_weights:
        common.append(f"eval.fid_weights={fid_weights}")
    return common + AGGREGATORS[run["aggregator"]] + run["extra"]


def execute(run: dict, cfg_overrides: list[str], run_dir: Path) -> dict:
    """One federation in this process; the final round's metrics, or the error that stopped it."""
    import numpy as np
    from safetensors.numpy import load_file

    from client_app.app import evaluate, train
    from feddm.attacks import attacking_client
    from feddm.local_grid import LocalGrid
    from server_app.config import compose_config
    from server_app.federation import run_federation

    def honest(msg, context):
        return evaluate(msg, context) if msg.metadata.message_type == "evaluate" else train(msg, context)

    attackers = list(range(run["attackers"]))
    client = attacking_client(honest, run["attack"], attackers) if attackers else honest
    grid = LocalGrid(range(1, NUM_CLIENTS + 1), client)
    for partition, context in enumerate(grid.contexts.values()):
        context.node_config.update({"partition-id": partition, "num-partitions": NUM_CLIENTS})

    started = time.perf_counter()
    out = {"aggregator": run["aggregator"], "checks": run["checks"], "attack": run["attack"]}
    out["attackers"] = run["attackers"]
    try:
        run_federation(grid, compose_config(cfg_overrides), run_dir)
        error = None
    except Exception as err:  # noqa: BLE001 -- a failed run is a row of the table
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        traceback.print_exc()
    out["wall_s"] = round(time.perf_counter() - started, 1)
    rows = []
    if (run_dir / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("round", 0) >= 1]
    out["rounds_done"] = len(rows)
    out["num_rejected"] = [int(r.get("num_rejected", 0)) for r in rows]
    out["num_aggregated"] = [r.get("num_aggregated") for r in rows]
    out["error"] = error
    last = rows[-1] if rows else {}
    out["eval_loss"] = last.get("eval_loss")
    out["fid"] = last.get("fid")
    out["kid"] = last.get("kid")
    weights = next((run_dir / "model").rglob("*.safetensors"), None) if (run_dir / "model").is_dir() else None
    if weights is not None:
        out["finite"] = bool(all(np.isfinite(v).all() for v in load_file(str(weights)).values()))
    else:
        out["finite"] = None  # no final model (the run failed)
    return out


def _num(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def ratios(results: dict) -> dict:
    """eval-loss, FID and KID ratios to the clean FedAvg run (checks on)."""
    clean = results.get("fedavg_none_0", {})
    for r in results.values():
        for key in ("eval_loss", "fid", "kid"):
            base, value = _num(clean.get(key)), r.get(key)
            value = _num(value)
            r[f"{key}_ratio"] = value / base if base and value is not None else None
    return results


def target(results: dict) -> tuple[bool, list[str]]:
    """With 1-2 of 8 attackers, some robust aggregator keeps eval loss within 10 % of clean FedAvg's."""
    from feddm.attacks import ATTACKS

    lines, met = [], True
    for attack in ATTACKS:
        for count in ATTACKER_COUNTS:
            best = [
                (r["eval_loss_ratio"], r["aggregator"])
                for r in results.values()
                if r["attack"] == attack
                and r["attackers"] == count
                and r["checks"] == "on"
                and r["aggregator"] in ROBUST
                and r["eval_loss_ratio"] is not None
            ]
            if not best:
                lines.append(f"{attack} x{count}: no robust aggregator ran")
                met = False
                continue
            ratio, name = min(best)
            ok = ratio <= 1.1
            met &= ok
            lines.append(f"{attack} x{count}: best {name} {ratio:.3f} ({'ok' if ok else 'over 1.1'})")
    return met, lines


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"


def table(results: dict) -> str:
    rows = []
    for r in results.values():
        rows.append(
            [
                r["aggregator"],
                r["checks"],
                r["attack"],
                r["attackers"],
                _fmt(r["eval_loss"]),
                _fmt(r["eval_loss_ratio"], 3),
                _fmt(r["fid"], 1),
                _fmt(r["fid_ratio"], 2),
                _fmt(r.get("kid"), 3),
                _fmt(r.get("kid_ratio"), 2),
                {True: "yes", False: "**no**", None: "-"}[r["finite"]],
                sum(r["num_rejected"]),
                "/".join(str(n) for n in r["num_aggregated"]) or "-",
                r["error"] or "ok",
                f"{r['wall_s']:.0f}",
            ]
        )
    return markdown_table(
        [
            "aggregator",
            "reply checks",
            "attack",
            "attackers of 8",
            "final eval loss",
            "eval loss / clean FedAvg",
            "FID",
            "FID / clean FedAvg",
            "KID",
            "KID / clean FedAvg",
            "global finite",
            "replies rejected (all rounds)",
            "replies aggregated per round",
            "run",
            "wall s",
        ],
        rows,
    )


def plot(results: dict, out: Path) -> None:
    """Eval-loss ratio per aggregator, grouped by attack and attacker count (log scale; x: run failed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from feddm.attacks import ATTACKS

    groups = [("none", 0)] + [(a, k) for a in ATTACKS for k in ATTACKER_COUNTS]
    series = [(a, "on") for a in AGGREGATORS] + [("fedavg", "off")]
    series = [s for s in series if any((r["aggregator"], r["checks"]) == s for r in results.values())]
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(12, 4.8))
    colors = plt.get_cmap("tab10").colors
    for i, (aggregator, checks) in enumerate(series):
        label = aggregator + (" (checks off)" if checks == "off" else "")
        xs, ys, fails = [], [], []
        for g, (attack, count) in enumerate(groups):
            key = f"{aggregator}{'_checks-off' if checks == 'off' else ''}_{attack}_{count}"
            r = results.get(key)
            if r is None:
                continue
            x = g - 0.4 + width * (i + 0.5)
            if r["eval_loss_ratio"] is None:
                fails.append(x)
            else:
                xs.append(x)
                ys.append(r["eval_loss_ratio"])
        ax.bar(xs, ys, width, label=label, color=colors[i % len(colors)])
        if fails:
            ax.plot(fails, [1.0] * len(fails), "x", color=colors[i % len(colors)], markersize=9, mew=2)
    ax.axhline(1.1, color="k", linestyle="--", linewidth=1, label="1.1x clean FedAvg")
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(["clean" if a == "none" else f"{a}\n{k} of 8" for a, k in groups])
    ax.set_yscale("log")
    ax.set_ylabel("final eval loss / clean FedAvg (log)")
    ax.set_title("Robustness: client eval loss after the last round (x: run failed, no eval loss)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def notes(scale_name: str, scale: dict, met: bool, lines: list[str], minutes: float) -> str:
    return (
        f"Scale `{scale_name}`: model `{scale['model']}`, {NUM_CLIENTS} clients (IID), {scale['rounds']} rounds x "
        f"{scale['local_steps']} local steps at batch {scale['batch_size']}, FedDM-vanilla, EMA off. After the "
        f"last round: clients' held-out loss (up to {scale['client_eval_max_examples']} images each) and FID of "
        f"the global model on {scale['num_samples']} DDIM-{scale['ddim_steps']} samples against as many test "
        "images (standard Inception weights; FID is biased upwards at this count and compares runs only; "
        "KID, from the same features, is unbiased; rows run before KID existed have none).\n\n"
        "Attackers are partitions 0 (1 of 8) or 0 and 1 (2 of 8), in every round (`feddm.attacks`). Krum and "
        "Multi-Krum assume f = 2 (Multi-Krum averages m = 4); Bulyan needs n >= 4f + 3, 11 clients for f = 2, "
        "so it runs with f = 1 (and fails a round that keeps fewer than 7 replies). Trimmed mean cuts 25 % "
        "from each end (2 of 8). Reply checks at their defaults (`max_num_examples` 10^9 outside Flower's "
        "simulation, `max_update_norm_ratio` 10); `fedavg` with checks `off` has "
        "`max_update_norm_ratio=null` and `max_num_examples` 10^301. Plot: `robustness.png`.\n\n"
        "Target: with 1-2 of 8 attackers some robust aggregator keeps eval loss within 10 % of clean FedAvg "
        f"for every attack: {'met' if met else 'missed'} ({'; '.join(lines)}).\n\n"
        f"The last invocation took {minutes:.1f} minutes."
    )


def earlier_runs(scale: dict) -> dict:
    """The runs of ``results/robustness.json`` if it was measured at the same scale, else none."""
    path = RESULTS / "robustness.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())["results"]
    if earlier.get("settings") != scale:
        print(f"{path} holds another scale's results; they are replaced", flush=True)
        return {}
    return earlier["runs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 2-CPU-core scale (about 30-40 minutes)")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "benchmarks" / "robustness")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--fid-weights", type=Path, default=DEFAULT_FID_WEIGHTS if DEFAULT_FID_WEIGHTS.is_file() else None
    )
    parser.add_argument("--only", nargs="+", help="run only these (names as in the json, e.g. fedavg_none_0)")
    for key, value in SCALES["quick"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), help="override the scale")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the machine is shared; more oversubscribes it)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    scale_name = "quick" if args.quick else "full"
    scale = dict(SCALES[scale_name])
    scale.update({k: v for k, v in vars(args).items() if k in scale and v is not None})

    work = (args.work / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    work.mkdir(parents=True)
    fid_cache = args.work.resolve() / "fid_cache"
    from flwr.supercore.task_identity import TaskIdentity

    # Messages built outside a running Flower app need run, node and task ids (Flower reads them globally).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    runs = [r for r in plan() if not args.only or run_name(r) in args.only]
    unknown = set(args.only or ()) - {run_name(r) for r in plan()}
    if unknown:
        raise SystemExit(
            f"--only: unknown runs {sorted(unknown)}; choose from {[run_name(r) for r in plan()]}"
        )
    order = [run_name(r) for r in plan()]
    results, started = earlier_runs(scale), time.perf_counter()
    for run in runs:
        name = run_name(run)
        cfg_overrides = overrides(
            run,
            scale,
            args.data_root.resolve(),
            args.fid_weights.resolve() if args.fid_weights else None,
            fid_cache,
        )
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        results[name] = execute(run, cfg_overrides, work / name)
        results = {k: results[k] for k in sorted(results, key=order.index)}
        r = results[name]
        print(
            f"    {r['wall_s']:.0f} s: eval_loss {r['eval_loss']}, fid {r['fid']}, finite {r['finite']}, "
            f"rejected {r['num_rejected']}, {r['error'] or 'ok'}",
            flush=True,
        )
        # Results after every run: an interrupted invocation still leaves what it measured.
        ratios(results)
        met, lines = target(results)
        minutes = (time.perf_counter() - started) / 60
        payload = {
            "scale": scale_name,
            "settings": scale,
            "runs": results,
            "target_met": met,
            "minutes": minutes,
        }
        write_results("robustness", payload, table(results), notes(scale_name, scale, met, lines, minutes))
        plot(results, RESULTS / "robustness.png")
    print((RESULTS / "robustness.md").read_text())


if __name__ == "__main__":
    main()
