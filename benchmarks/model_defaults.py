"""Does each model size train at its own default learning rate? And at the tiny model's 1e-3?

For every model group (``conf/model``): 2 clients train their own copy of the
global UNet with the real client loop (``client_app.task.local_train``: a fresh
AdamW per round, gradient clipping 1.0) on their half of a small Fashion-MNIST
sample, the server averages the two (FedAvg, equal weights), for 2 rounds. The
table reports the mean train loss of each round and the held-out loss (fixed
noise) after it, at the model group's ``lr`` and at 1e-3 (the old default of
every model) side by side. Images are resized to the size the model is meant
for (cifar10: 32 px, celeba: 64 px); ``ldm`` trains on the 4 x 28 x 28 latents
of a random one-level ``AutoencoderKL``, scaled to unit variance, and also
without that scaling (the autoencoder's own 0.18215).

    python benchmarks/model_defaults.py [--steps 5] [--models tiny,ldm]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, markdown_table, write_results  # noqa: E402
from client_app.task import ClientSettings, local_evaluate, local_train  # noqa: E402
from models import LabeledImages, build_scheduler, build_unet, load_image_dataset  # noqa: E402
from models.latent import encode  # noqa: E402
from server_app.config import compose_config, group_options  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZES = {"tiny": 28, "fashion_mnist": 28, "cifar10": 32, "celeba": 64, "ldm": 28}
OLD_DEFAULT_LR = 1e-3


def images_for(size: int, count: int) -> torch.Tensor:
    """``count`` Fashion-MNIST training images in [-1, 1], resized to ``size`` px (every 50th image)."""
    data = load_image_dataset("fashion_mnist", DATA, train=True)
    images = torch.stack([data[i] for i in range(0, 50 * count, 50)])
    return images if size == 28 else F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def latents_for(images: torch.Tensor, unit: bool) -> torch.Tensor:
    """Latents of a random one-level AutoencoderKL (4 x 28 x 28), optionally scaled to unit variance."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=8,
    ).eval()
    latents = encode(autoencoder, images)
    return latents / latents.std() if unit else latents


def settings_for(lr: float, steps: int, batch_size: int) -> ClientSettings:
    return ClientSettings(
        unet={},
        autoencoder=None,
        scheduler={},
        dataset={},
        partition={},
        lr=lr,
        weight_decay=0.0,
        local_steps=steps,
        local_epochs=0,
        batch_size=batch_size,
        max_grad_norm=1.0,
        seed=0,
        device="cpu",
        eval_fraction=0.1,
        eval_max_examples=64,
        ema_enabled=False,
        ema_decay=0.9,
    )


def federated_run(model: str, data: torch.Tensor, lr: float, steps: int, batch_size: int) -> dict:
    """2 clients x 2 rounds of FedAvg; per round the mean train loss and the held-out loss after it."""
    cfg = compose_config([f"model={model}"])
    torch.manual_seed(0)
    unet = build_unet(
        OmegaConf.to_container(cfg.model.unet), image_size=data.shape[-1], channels=data.shape[1]
    )
    scheduler = build_scheduler({**OmegaConf.to_container(cfg.scheduler), "clip_sample": model != "ldm"})
    dataset = LabeledImages(data, np.zeros(len(data)))
    holdout = np.arange(len(data) - 64, len(data))
    halves = np.array_split(np.arange(len(data) - 64), 2)
    settings = settings_for(lr, steps, batch_size)
    rows = []
    for server_round in (1, 2):
        states, losses = [], []
        for client, indices in enumerate(halves):
            local = copy.deepcopy(unet)
            loss, _ = local_train(
                local, scheduler, dataset, indices, settings, seed=100 * server_round + client
            )
            states.append(local.state_dict())
            losses.append(loss)
        unet.load_state_dict({k: (states[0][k] + states[1][k]) / 2 for k in states[0]})
        held_out, _ = local_evaluate(unet, scheduler, dataset, holdout, settings, seed=7)
        rows.append({"train_loss": round(float(np.mean(losses)), 4), "eval_loss": round(held_out, 4)})
    trains = [r["train_loss"] for r in rows]
    evals = [r["eval_loss"] for r in rows]
    return {
        "lr": lr,
        "rounds": rows,
        "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "loss_goes_down": bool(trains[1] < trains[0] and evals[1] < evals[0] < 0.95),
    }


def table_row(key: str, run: dict) -> list:
    """A Markdown row of one run (key: 'MODEL[ (variant)] lr=LR')."""
    r1, r2 = run["rounds"]
    model = key.rsplit(" lr=", 1)[0]
    lr = f"{run['lr']:g}" + (" (default)" if run.get("default") else "")
    return [
        model,
        run["parameters_m"],
        lr,
        f"{r1['train_loss']} / {r2['train_loss']}",
        f"{r1['eval_loss']} / {r2['eval_loss']}",
        "yes" if run["loss_goes_down"] else "**no**",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="local steps per client and round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=320, help="images in all (64 of them held out)")
    parser.add_argument(
        "--models",
        default=",".join(group_options("model")),
        help="model groups to run; the others' rows are kept from the last results (same settings)",
    )
    parser.add_argument(
        "--extra-lrs", default="", help="more learning rates to try beside the default and 1e-3"
    )
    args = parser.parse_args()
    settings = {"steps": args.steps, "batch_size": args.batch_size, "images": args.images}
    runs = _kept_runs(settings, args.models.split(","))
    for model in args.models.split(","):
        data = images_for(SIZES[model], args.images)
        variants = {"": data}
        if model == "ldm":
            variants = {
                " (unit latents)": latents_for(data, True),
                " (latents x 0.18215)": latents_for(data, False),
            }
        default_lr = float(compose_config([f"model={model}"]).model.lr)
        for label, inputs in variants.items():
            extra = [float(x) for x in args.extra_lrs.split(",") if x]
            for lr in dict.fromkeys([default_lr, OLD_DEFAULT_LR, *extra]):
                run = federated_run(model, inputs, lr, args.steps, args.batch_size)
                run["default"] = lr == default_lr
                runs[f"{model}{label} lr={lr:g}"] = run
                print(model + label, run, flush=True)
    header = [
        "model",
        "params (M)",
        "lr",
        "train loss round 1 / 2",
        "held-out loss after round 1 / 2",
        "loss goes down",
    ]
    table = markdown_table(header, [table_row(key, runs[key]) for key in sorted(runs)])
    notes = (
        f"2 clients x 2 rounds x {args.steps} local steps, batch {args.batch_size}, "
        f"{args.images - 64} training and 64 held-out Fashion-MNIST images; the loss of predicting zeros is "
        "1.0. 'loss goes down': both losses fall from round 1 to 2 and the held-out loss ends below 0.95."
    )
    write_results("model_defaults", {"settings": settings, "runs": runs}, table, notes)


def _kept_runs(settings: dict, models: list[str]) -> dict:
    """Runs of other models from the last results with the same settings (re-running one model keeps the rest)."""
    path = RESULTS / "model_defaults.json"
    if not path.is_file():
        return {}
    last = json.loads(path.read_text())["results"]
    if last.get("settings") != settings:
        return {}
    return {k: v for k, v in last["runs"].items() if k.split(" ")[0] not in models}


if __name__ == "__main__":
    main()
