"""Local training throughput (images/s): FedDM's client loop vs a plain diffusers loop, fp32 / bf16 / compile.

    python benchmarks/train_throughput.py [--quick] [--models fashion_mnist cifar10] [--device auto]

For each UNet (the fashion_mnist and cifar10 presets), in one process on one
device (CUDA when there is one), side by side:

* **feddm**: ``client_app.task.local_train``, what a client runs each round
  (its DataLoader, AdamW, noise from a seeded CPU generator, losses summed on
  the device and read once), at ``precision`` fp32, bf16, and bf16 with
  ``compile=true``;
* **plain**: diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
  recipe without accelerate (DataLoader, AdamW, a cosine learning-rate schedule,
  noise drawn on the device, ``loss.item()`` every step for the progress bar,
  gradient clipping at 1.0), at fp32 and bf16 (autocast, as accelerate's
  ``mixed_precision`` does); on a CPU also fp32 channels-last, which is why the
  client loop uses channels-last on GPUs only.

The images are random tensors of the dataset's shape (speed does not depend on
their content). Each variant is warmed up (and compiled) first, then timed
``--repeats`` times over ``--steps`` steps, the variants taking turns so that
a change in the machine's load hits them alike; the median is reported.
Targets (#19), on a GPU: feddm >= 0.95x plain at the same precision, and bf16
>= 1.8x fp32. Nothing is estimated: without a GPU the GPU columns say so.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from client_app.task import local_train, read_settings  # noqa: E402
from models import build_scheduler, build_unet, resolve_device  # noqa: E402
from models.data import LabeledImages  # noqa: E402
from models.precision import Precision, resolve_precision  # noqa: E402
from server_app.config import compose_config  # noqa: E402
from server_app.federation import client_config  # noqa: E402

TARGET_VS_PLAIN = 0.95  # on a GPU, at the same precision
TARGET_BF16 = 1.8  # on a GPU, bf16 vs fp32 images/s
GEOMETRY = {"fashion_mnist": (28, 1), "cifar10": (32, 3)}  # image size, channels


def plain_diffusers_loop(
    unet, scheduler, data: torch.Tensor, *, steps, batch_size, lr, precision, channels_last
):
    """diffusers' train_unconditional.py inner loop, without accelerate; returns the mean loss."""
    device = next(unet.parameters()).device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    unet.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=500, num_training_steps=10_000)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    losses, batches = [], iter(())
    unet.train()
    for _ in range(steps):
        clean = next(batches, None)
        if clean is None:
            batches = iter(loader)
            clean = next(batches)
        clean = clean.to(device, memory_format=memory_format)
        noise = torch.randn(clean.shape, dtype=clean.dtype, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with precision.autocast():
            output = unet(noisy, timesteps).sample
        loss = F.mse_loss(output.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.detach().item())  # the recipe's progress bar reads it every step
    unet.to(memory_format=torch.contiguous_format)
    return float(np.mean(losses))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(
    model: str, device: torch.device, batch_size: int, step_counts: tuple[int, ...], compile_: bool = True
) -> dict[str, Callable[[int], None]]:
    """name -> run(steps), steps in ``step_counts``: each trains its own copy of the same UNet on the same images."""
    size, channels = GEOMETRY[model]
    overrides = [f"model={model}", f"batch_size={batch_size}"]
    cfg = compose_config(overrides)
    torch.manual_seed(0)
    unet0 = build_unet(OmegaConf.to_container(cfg.model.unet), image_size=size, channels=channels)
    scheduler = build_scheduler(OmegaConf.to_container(cfg.scheduler))
    images = (
        torch.rand(batch_size * 8, channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    )
    dataset = LabeledImages(images, np.zeros(len(images), dtype=np.int64))
    indices = np.arange(len(images))
    bf16 = resolve_precision("bf16", device)
    fp32 = Precision("fp32", device.type)

    def feddm(precision: Precision, compiled: bool, memory_format: str = "auto") -> Callable[[int], None]:
        unet = copy.deepcopy(unet0).to(device)  # every variant starts from the same weights

        settings = {  # made before the timing: a client receives them in its message
            steps: read_settings(
                client_config(
                    compose_config(
                        [
                            *overrides,
                            f"local_steps={steps}",
                            f"compile={compiled}",
                            f"memory_format={memory_format}",
                        ]
                    ),
                    unet,
                    scheduler,
                )
            )
            for steps in step_counts
        }

        def run(steps: int) -> None:
            local_train(unet, scheduler, dataset, indices, settings[steps], seed=0, precision=precision)

        return run

    def plain(precision: Precision, channels_last: bool = False) -> Callable[[int], None]:
        unet = copy.deepcopy(unet0).to(device)  # every variant starts from the same weights

        def run(steps: int) -> None:
            plain_diffusers_loop(
                unet,
                scheduler,
                images,
                steps=steps,
                batch_size=batch_size,
                lr=float(cfg.lr),
                precision=precision,
                channels_last=channels_last,
            )

        return run

    runs = {
        "plain fp32": plain(fp32),
        "feddm fp32": feddm(fp32, False),
        "plain bf16": plain(bf16),
        "feddm bf16": feddm(bf16, False),
    }
    if compile_:
        runs["feddm bf16 + compile"] = feddm(bf16, True)
    if device.type == "cpu":  # auto is contiguous on a CPU: does channels-last pay off here?
        runs["plain fp32 channels-last"] = plain(fp32, channels_last=True)
        runs["feddm fp32 channels-last"] = feddm(fp32, False, "channels_last")
        runs["feddm bf16 channels-last"] = feddm(bf16, False, "channels_last")
    return runs


def measure(
    model: str, device: torch.device, *, batch_size: int, steps: int, repeats: int, compile_: bool = True
) -> dict:
    """images/s per variant (median of ``repeats``), and each variant's warm-up (compile) seconds."""
    runs = variants(model, device, batch_size, (2, steps), compile_)
    warmup_s, times = {}, {name: [] for name in runs}
    for name, run in runs.items():
        started = time.perf_counter()
        run(2)  # first calls: oneDNN/cuDNN kernel choice, and torch.compile's compilation
        _sync(device)
        warmup_s[name] = round(time.perf_counter() - started, 2)
        print(f"[{model}] {name}: warm-up {warmup_s[name]} s", flush=True)
    for repeat in range(repeats):
        for name, run in runs.items():  # in turns: a load change hits every variant alike
            started = time.perf_counter()
            run(steps)
            _sync(device)
            times[name].append(time.perf_counter() - started)
        print(f"[{model}] repeat {repeat + 1}/{repeats} done", flush=True)
    per_s = {name: batch_size * steps / statistics.median(t) for name, t in times.items()}
    return {
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
        "images_per_s": {k: round(v, 2) for k, v in per_s.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "warmup_s": warmup_s,
        "ratio_feddm_vs_plain_fp32": round(per_s["feddm fp32"] / per_s["plain fp32"], 3),
        "ratio_feddm_vs_plain_bf16": round(per_s["feddm bf16"] / per_s["plain bf16"], 3),
        "ratio_bf16_vs_fp32": round(per_s["feddm bf16"] / per_s["feddm fp32"], 3),
        **(
            {"ratio_compile_vs_bf16": round(per_s["feddm bf16 + compile"] / per_s["feddm bf16"], 3)}
            if "feddm bf16 + compile" in per_s
            else {}
        ),
        **(
            {
                "ratio_channels_last_vs_fp32": round(
                    per_s["plain fp32 channels-last"] / per_s["plain fp32"], 3
                ),
                "ratio_feddm_channels_last_vs_fp32": round(
                    per_s["feddm fp32 channels-last"] / per_s["feddm fp32"], 3
                ),
                "ratio_feddm_channels_last_vs_bf16": round(
                    per_s["feddm bf16 channels-last"] / per_s["feddm bf16"], 3
                ),
            }
            if "plain fp32 channels-last" in per_s
            else {}
        ),
    }


def report(results: dict, device: torch.device) -> tuple[str, str]:
    """The Markdown table and notes."""
    rows = []
    for model, r in results.items():
        for name, rate in r["images_per_s"].items():
            rows.append([model, name, r["batch_size"], rate, r["warmup_s"][name]])
    table = markdown_table(
        ["model", "loop", "batch", "images/s (median)", "warm-up s (2 steps, compile)"], rows
    )
    lines = []
    for model, r in results.items():
        ratios = (
            f"feddm/plain fp32 {r['ratio_feddm_vs_plain_fp32']}x, feddm/plain bf16 {r['ratio_feddm_vs_plain_bf16']}x, "
            f"bf16/fp32 {r['ratio_bf16_vs_fp32']}x"
        )
        if "ratio_compile_vs_bf16" in r:
            ratios += f", compile/bf16 {r['ratio_compile_vs_bf16']}x"
        if "ratio_channels_last_vs_fp32" in r:
            ratios += (
                f", channels-last/contiguous: plain fp32 {r['ratio_channels_last_vs_fp32']}x, feddm fp32 "
                f"{r['ratio_feddm_channels_last_vs_fp32']}x, feddm bf16 {r['ratio_feddm_channels_last_vs_bf16']}x"
            )
        lines.append(f"- {model}: {ratios} ({r['repeats']} x {r['steps']} steps each).")
    if device.type == "cuda":
        for model, r in results.items():
            vs_plain = min(r["ratio_feddm_vs_plain_fp32"], r["ratio_feddm_vs_plain_bf16"])
            met = [
                f"feddm >= {TARGET_VS_PLAIN}x plain: " + ("met" if vs_plain >= TARGET_VS_PLAIN else "missed"),
                f"bf16 >= {TARGET_BF16}x fp32: "
                + ("met" if r["ratio_bf16_vs_fp32"] >= TARGET_BF16 else "missed"),
            ]
            lines.append(f"- GPU targets, {model}: " + "; ".join(met) + ".")
    else:
        lines.append(
            "- Measured on the CPU; the targets (feddm >= 0.95x plain at the same precision, bf16 >= 1.8x fp32) "
            "are for a GPU, and no GPU was lent to this run: no GPU figures, none estimated."
        )
    return table, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 steps, 2 repeats")
    parser.add_argument("--models", nargs="+", default=list(GEOMETRY), choices=list(GEOMETRY))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on a CPU, 128 on a GPU")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default 6 CPU, 50 GPU)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile-models",
        nargs="*",
        default=None,
        help="models also timed with compile=true (default: all; on 2 CPU cores compiling the cifar10 "
        "UNet ran for more than 25 minutes)",
    )
    parser.add_argument(
        "--name", default="train_throughput", help="results file name (benchmarks/results/NAME)"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    batch_size = args.batch_size or (8 if args.quick else 128 if gpu else 32)
    steps = args.steps or (3 if args.quick else 50 if gpu else 6)
    repeats = 2 if args.quick else args.repeats
    compiled = args.models if args.compile_models is None else args.compile_models
    results = {
        model: measure(
            model, device, batch_size=batch_size, steps=steps, repeats=repeats, compile_=model in compiled
        )
        for model in args.models
    }
    table, notes = report(results, device)
    path = write_results(args.name, {"device": str(device), "models": results}, table, notes)
    print(table + "\n\n" + notes + f"\n\nwrote {path}")


if __name__ == "__main__":
    main()
