"""``feddm-plot RUN_DIR [RUN_DIR ...] --out FILE.png``: compare runs.

Three panels: FID vs round, losses vs round, and FID vs cumulative uplink bytes
(the communication/quality frontier). Each run is labelled by its strategy
(and partition), read from the run folder's ``config.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from server_app.run_folder import read_metrics  # noqa: E402


def run_label(run_dir: Path) -> str:
    """``strategy (partition)`` from the run's config, else the folder name."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return run_dir.name
    cfg = OmegaConf.load(config)
    label = str(cfg.strategy.name)
    if cfg.partition.name == "dirichlet":
        label += f" (dirichlet α={cfg.partition.alpha})"
    elif cfg.partition.name != "iid":
        label += f" ({cfg.partition.name})"
    return label


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``, or a clear error."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; is it a FedDM run folder?")
    return read_metrics(path)


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw the three panels for ``run_dirs`` into ``out``."""
    fig, (ax_fid, ax_loss, ax_bytes) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run_dir in run_dirs:
        rows = read_rows(run_dir)
        label = run_label(run_dir)
        rounds = [r["round"] for r in rows]
        uplink = np.cumsum([r.get("uplink_bytes", 0) for r in rows]) / 1e6
        fid = [(r["round"], u, r["fid"]) for r, u in zip(rows, uplink) if "fid" in r]
        if fid:
            ax_fid.plot([f[0] for f in fid], [f[2] for f in fid], marker="o", label=label)
            ax_bytes.plot([f[1] for f in fid], [f[2] for f in fid], marker="o", label=label)
        (line,) = ax_loss.plot(rounds, [r.get("train_loss", np.nan) for r in rows], label=f"{label} train")
        ax_loss.plot(
            rounds,
            [r.get("eval_loss", np.nan) for r in rows],
            linestyle="--",
            color=line.get_color(),
            label=f"{label} eval",
        )
    ax_fid.set(title="FID vs round", xlabel="round", ylabel="FID")
    ax_loss.set(title="Diffusion loss vs round", xlabel="round", ylabel="MSE (noise)")
    ax_bytes.set(title="FID vs cumulative uplink", xlabel="uplink MB (all clients)", ylabel="FID")
    for ax in (ax_fid, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_fid, ax_loss, ax_bytes):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``feddm-plot``."""
    parser = argparse.ArgumentParser(prog="feddm-plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="FedDM run folders")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    print(plot_runs(args.run_dirs, args.out))


if __name__ == "__main__":
    main()
