"""``feddm-sample MODEL_DIR --num 64 --out grid.png [--ddim-steps 50] [--seed S] [--precision auto]``.

Draws images from a saved model folder (a diffusers ``DDPMPipeline``, e.g.
``RUN_DIR/model``) and writes them as one grid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models import load_pipeline, resolve_device
from models.grid import save_grid
from models.latent import generate_images, load_autoencoder
from models.precision import PRECISIONS, resolve_precision


def sample_grid(
    model_dir: Path,
    num: int,
    out: Path,
    *,
    ddim_steps: int | None,
    seed: int,
    device: str = "auto",
    precision: str = "auto",
) -> Path:
    """Sample ``num`` images from ``model_dir`` into the grid PNG ``out`` (forward passes in ``precision``)."""
    if not (Path(model_dir) / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    pipeline = load_pipeline(model_dir)
    unet = pipeline.unet.to(resolve_device(device))
    autocast = resolve_precision(precision, unet.device).autocast()
    autoencoder = None
    saved = Path(model_dir) / "autoencoder" / "config.json"
    if saved.is_file():  # latent diffusion: decode the sampled latents with the saved autoencoder
        kind = "vq" if json.loads(saved.read_text()).get("_class_name") == "VQModel" else "kl"
        autoencoder = load_autoencoder(str(saved.parent), kind)
    with autocast:
        images = generate_images(
            unet,
            pipeline.scheduler,
            num,
            seed=seed,
            ddim_steps=ddim_steps,
            autoencoder=autoencoder,
            show_progress=True,
        )
    return save_grid(images, out)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``feddm-sample``."""
    parser = argparse.ArgumentParser(prog="feddm-sample", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="saved model folder (RUN_DIR/model)")
    parser.add_argument("--num", type=int, default=64, help="number of images")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps (default: full DDPM)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 on a GPU that supports it, else fp32",
    )
    args = parser.parse_args(argv)
    if args.num < 1 or (args.ddim_steps is not None and args.ddim_steps < 1):
        parser.error("--num and --ddim-steps must be >= 1")
    with torch.no_grad():  # not a global switch: main() is also called in-process (tests)
        print(
            sample_grid(
                args.model_dir,
                args.num,
                args.out,
                ddim_steps=args.ddim_steps,
                seed=args.seed,
                device=args.device,
                precision=args.precision,
            )
        )


if __name__ == "__main__":
    main()
