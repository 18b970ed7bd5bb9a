"""Federated fine-tuning of a pretrained model: full fine-tuning vs LoRA adapters (#21).

    python benchmarks/finetune.py --quick     # 2 CPU cores
    python benchmarks/finetune.py             # full scale, for a GPU machine

A base model is trained centrally (one client holding every image of Fashion-MNIST
classes 0-4; the same app, no federation) and kept in ``--work-dir`` (a later
invocation reuses it). Then 4 clients holding classes 5-9 (Dirichlet alpha 0.3
among them) fine-tune it federatedly, each variant for the same rounds and local
steps: the whole UNet, LoRA rank 4 and 16 (attention projections and the ResNet
convolutions), and LoRA ranks 4, 2 and 1 with int8 update codes (a rank-r LoRA of a
3x3 convolution with C channels has about C/r times fewer parameters: on a small
UNet rank 4 alone cannot reach the target). FID and KID on classes 5-9
come from each run's evaluation (``dataset.classes``: the test images of those
classes are the reference), with the cumulative uplink bytes at each evaluation;
the final models are also scored against classes 0-4 to show what the base
forgot. Writes ``benchmarks/results/finetune[_quick].{json,md}``.

Targets: LoRA + int8 sends >= 100x fewer uplink bytes per round than full
fine-tuning, at an FID on the new classes within 1.15x of full fine-tuning's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from benchmarks.quality import DEFAULT_FID_WEIGHTS, Run, execute, summarize  # noqa: E402

BASE_CLASSES, NEW_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
NUM_CLIENTS = 4
LORA = ["adapter=lora", "adapter.target_modules=[to_q,to_k,to_v,to_out.0,conv1,conv2]"]
# The target's pair first: a cut-short invocation has what the target needs.
VARIANTS = {
    "full": [],
    "lora4+int8": [*LORA, "adapter.rank=4", "strategy=quant"],
    "lora2+int8": [*LORA, "adapter.rank=2", "strategy=quant"],
    "lora1+int8": [*LORA, "adapter.rank=1", "strategy=quant"],
    "lora4": [*LORA, "adapter.rank=4"],
    "lora16": [*LORA, "adapter.rank=16"],
}
SCALES = {
    "quick": dict(
        model="tiny", base_rounds=4, base_steps=100, rounds=6, local_steps=25, eval_every=3,
        num_samples=500, ddim_steps=10, batch_size=32, lr=1e-3,
    ),
    "full": dict(
        model="fashion_mnist", base_rounds=10, base_steps=1000, rounds=20, local_steps=250, eval_every=5,
        num_samples=5000, ddim_steps=50, batch_size=64, lr=2e-4,
    ),
}  # fmt: skip
TARGET_BYTES_RATIO, TARGET_FID_RATIO = 100.0, 1.15


def common_overrides(scale: dict, data_root: Path, fid_weights: Path | None, fid_cache: Path) -> list[str]:
    """What every run shares: model size, evaluation, data."""
    overrides = [
        f"model={scale['model']}", f"batch_size={scale['batch_size']}", f"eval.num_samples={scale['num_samples']}",
        f"eval.ddim_steps={scale['ddim_steps']}", f"eval.fid_cache={fid_cache}", f"dataset.root={data_root}",
        "checkpoint_every=0", "seed=0",
    ]  # fmt: skip
    return overrides + ([f"eval.fid_weights={fid_weights}"] if fid_weights else [])


def base_overrides(scale: dict, common: list[str]) -> list[str]:
    """The base model: one client with every image of classes 0-4, trained centrally."""
    return [
        *common, "num_clients=1", "strategy=vanilla", "partition=iid", f"num_rounds={scale['base_rounds']}",
        f"local_steps={scale['base_steps']}", f"eval.every={scale['base_rounds']}",
        f"dataset.classes=[{','.join(map(str, BASE_CLASSES))}]",
    ]  # fmt: skip


def finetune_overrides(variant: str, scale: dict, common: list[str], base_model: Path) -> list[str]:
    """One fine-tuning run: 4 clients with classes 5-9, Dirichlet 0.3, from the base pipeline."""
    return [
        *common, f"num_clients={NUM_CLIENTS}", "partition=dirichlet", "partition.alpha=0.3",
        f"dataset.classes=[{','.join(map(str, NEW_CLASSES))}]", f"model.pretrained={base_model}",
        f"num_rounds={scale['rounds']}", f"local_steps={scale['local_steps']}", f"eval.every={scale['eval_every']}",
        f"lr={scale['lr']}", *VARIANTS[variant],
    ]  # fmt: skip


def forgetting_fid(
    model_dir: Path, scale: dict, data_root: Path, fid_weights: Path | None, cache: Path
) -> dict:
    """FID and KID of a final model against the test images of the base's classes (0-4).

    Kept beside the model (``forgetting.json``), so a later invocation that reuses the run reuses it.
    """
    import json

    kept = model_dir.parent / "forgetting.json"
    if kept.is_file():
        return json.loads(kept.read_text())

    import torch
    from diffusers import DDPMPipeline

    from models.data import dataset_from_config
    from models.durable import write_text_atomic
    from models.fid import FID
    from models.latent import generate_images

    pipeline = DDPMPipeline.from_pretrained(model_dir)
    spec = {"name": "fashion_mnist", "root": str(data_root), "classes": BASE_CLASSES}
    fid = FID(
        weights_path=fid_weights, cache_dir=cache, device=torch.device("cpu"), batch_size=scale["batch_size"]
    )
    fid.set_real(
        dataset_from_config(spec, train=False), scale["num_samples"], "fashion_mnist-28px-test-classes0_4"
    )
    with torch.no_grad():
        images = generate_images(
            pipeline.unet, pipeline.scheduler, scale["num_samples"], seed=0, ddim_steps=scale["ddim_steps"],
            batch_size=scale["batch_size"],
        )  # fmt: skip
    scores = fid.score(images)
    write_text_atomic(kept, json.dumps(scores))
    return scores


def report(results: dict, scale_name: str) -> tuple[str, str]:
    """The table (one row per variant) and the notes with the targets."""
    full = results["variants"].get("full")
    rows = []
    for name, r in results["variants"].items():
        per_round = r["total_uplink_bytes"] / r["rounds"]
        rows.append([
            name, f"{r['final_fid']:.1f}", f"{r['final_kid']:.4f}", f"{r['forgetting']['fid']:.1f}",
            f"{per_round / 1e6:.3f}",
            f"{full['total_uplink_bytes'] / r['total_uplink_bytes']:.1f}x" if full else "-",
            f"{r['final_fid'] / full['final_fid']:.3f}x" if full else "-", f"{r['wall_s']:.0f}",
        ])  # fmt: skip
    header = [
        "variant", "FID 5-9", "KID 5-9", "FID 0-4 (forgetting)", "uplink MB/round", "uplink vs full", "FID vs full",
        "wall s",
    ]  # fmt: skip
    base = results["base"]
    notes = [
        f"Scale `{scale_name}`: base trained centrally on classes 0-4 (FID {base['final_fid']:.1f} on 0-4); "
        f"{NUM_CLIENTS} clients with classes 5-9, Dirichlet 0.3; every variant the same rounds and local steps.",
    ]
    coded = {k: v for k, v in results["variants"].items() if k.startswith("lora") and k.endswith("+int8")}
    if full and coded:
        outcomes = []
        for variant, lora in coded.items():
            bytes_ratio = full["total_uplink_bytes"] / lora["total_uplink_bytes"]
            fid_ratio = lora["final_fid"] / full["final_fid"]
            met = bytes_ratio >= TARGET_BYTES_RATIO and fid_ratio <= TARGET_FID_RATIO
            outcomes.append(
                f"{variant} {bytes_ratio:.1f}x fewer bytes at {fid_ratio:.3f}x the FID: "
                + ("met" if met else "missed")
            )
        notes.append(
            f"Target (LoRA + int8 >= {TARGET_BYTES_RATIO:.0f}x fewer uplink bytes per round than full fine-tuning, "
            f"FID within {TARGET_FID_RATIO}x): " + "; ".join(outcomes) + "."
        )
    return markdown_table(header, rows), "\n\n".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 2-core CPU scale")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "benchmarks" / "finetune")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--fid-weights", type=Path, default=DEFAULT_FID_WEIGHTS)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="these variants only")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    args = parser.parse_args()
    scale_name = "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    work = args.work_dir.resolve() / scale_name
    work.mkdir(parents=True, exist_ok=True)
    fid_weights = args.fid_weights if args.fid_weights and args.fid_weights.is_file() else None
    common = common_overrides(scale, args.data_root.resolve(), fid_weights, work / "fid_cache")

    base_run = Run("base", "classes0-4")  # kept in the work dir: a later invocation reuses it
    base_outcome = execute(base_run, base_overrides(scale, common), work, scale["base_rounds"])
    base_model = Path(base_outcome["run_dir"]) / "model"
    results = {"scale": scale, "base": summarize(base_run, base_outcome), "variants": {}}
    for variant in args.only or VARIANTS:
        run = Run(variant, "dirichlet-0.3")
        outcome = execute(run, finetune_overrides(variant, scale, common, base_model), work, scale["rounds"])
        summary = summarize(run, outcome) | {"rounds": scale["rounds"]}
        model_dir = Path(outcome["run_dir"]) / "model"
        summary["forgetting"] = forgetting_fid(model_dir, scale, args.data_root.resolve(), fid_weights, work)
        results["variants"][variant] = summary
    table, notes = report(results, scale_name)
    name = "finetune_quick" if args.quick else "finetune"
    print(table + "\n\n" + notes)
    print(write_results(name, results, table, notes, folder=args.results_dir))


if __name__ == "__main__":
    main()
