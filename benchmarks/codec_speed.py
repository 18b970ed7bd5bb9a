"""int8 codec speed on the cifar10 UNet vs a local training step and a memory copy.

    python benchmarks/codec_speed.py [--quick]

Measures, in one process on the same machine: encoding a client update of the
DDPM-paper CIFAR-10 UNet (35.7M parameters) to int8 (``client_app.updates.
quantized_update``, what clients run) plus decoding it (``strategies.codec.
decode_arrays``, what the server runs); one local training step of the same
model (``models.train_step``) at the default config's batch size; and a plain
copy of the same fp32 bytes. The target compares the codec with a local round
of ``local_steps`` steps (the default config's value). ``--quick`` uses batch 8
and fewer repetitions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from client_app.updates import quantized_update  # noqa: E402
from models import build_scheduler, build_unet, make_optimizer, train_step  # noqa: E402
from server_app.config import compose_config  # noqa: E402
from strategies.codec import decode_arrays  # noqa: E402
from strategies.quant import reference_of  # noqa: E402

TARGET_SHARE = 0.02


def best_of(repeats: int, fn) -> float:
    """Fastest wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, fewer repeats")
    args = parser.parse_args()
    cfg = compose_config(["experiment=cifar10_paper"])
    default = compose_config()
    default_steps = int(default.local_steps)
    batch = 8 if args.quick else int(default.batch_size)
    repeats = 2 if args.quick else 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(0)
    unet = build_unet(OmegaConf.to_container(cfg.model.unet), image_size=32, channels=3).to(device)
    scheduler = build_scheduler(OmegaConf.to_container(cfg.scheduler))
    received = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
    optimizer = make_optimizer(unet, lr=2e-4)
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    generator = torch.Generator().manual_seed(0)

    def step():
        train_step(unet, scheduler, optimizer, images, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, kernels)
    step_s = best_of(repeats, step)
    local = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    config = {
        "quant-bits": 8,
        "quant-granularity": "channel",
        "quant-stochastic": False,
        "quant-error-feedback": False,
    }
    reference = reference_of(ArrayRecord(received))
    holder = {}

    def encode():
        holder["record"] = quantized_update(local, received, config, RecordDict(), seed=0)

    def decode():
        decode_arrays(holder["record"], reference)

    encode_s = best_of(repeats, encode)
    decode_s = best_of(repeats, decode)
    flat = torch.cat([v.flatten() for v in local.values()])
    copy_s = best_of(repeats, lambda: flat.clone())
    codec_s = encode_s + decode_s
    local_round_s = default_steps * step_s
    share = codec_s / local_round_s
    results = {
        "parameters": int(flat.numel()),
        "device": str(device),
        "batch_size": batch,
        "train_step_s": step_s,
        "local_steps": default_steps,
        "local_round_s": local_round_s,
        "encode_s": encode_s,
        "decode_s": decode_s,
        "codec_s": codec_s,
        "memcopy_s": copy_s,
        "codec_vs_train_step": codec_s / step_s,
        "codec_share_of_local_round": share,
        "codec_vs_memcopy": codec_s / copy_s,
        "target_share": TARGET_SHARE,
        "target_met": share <= TARGET_SHARE,
    }
    rows = [
        [f"one training step (batch {batch})", f"{step_s:.3f}", "1.00"],
        [f"local round ({default_steps} steps)", f"{local_round_s:.2f}", f"{local_round_s / step_s:.2f}"],
        ["int8 encode (client)", f"{encode_s:.3f}", f"{encode_s / step_s:.3f}"],
        ["int8 decode (server)", f"{decode_s:.3f}", f"{decode_s / step_s:.3f}"],
        ["memory copy of the fp32 bytes", f"{copy_s:.4f}", f"{copy_s / step_s:.4f}"],
    ]
    table = markdown_table(["what (cifar10 UNet, 35.7M parameters)", "seconds", "x one training step"], rows)
    notes = (
        f"Codec (encode + decode) = {share:.2%} of a local round of {default_steps} steps "
        f"(target <= {TARGET_SHARE:.0%}: {'met' if share <= TARGET_SHARE else 'MISSED'}); "
        f"{codec_s / copy_s:.0f}x a plain memory copy of the same bytes. Device: {device}.\n\n"
        f"The codec runs in NumPy on the CPU wherever training runs: the target holds as long as a "
        f"training step takes at least {codec_s / (TARGET_SHARE * default_steps) * 1000:.0f} ms "
        f"(codec / (2% x {default_steps} steps)). A fast GPU may step quicker than that; there the codec "
        "would need to run on the device (torch ops instead of NumPy) to stay under 2%."
    )
    print(write_results("codec_speed", results, table, notes))
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
