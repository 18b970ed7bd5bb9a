"""Server-side evaluation of the global (or EMA) model: sample grids, FID and KID."""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from flwr.supercore import log
from omegaconf import DictConfig

from models.data import dataset_from_config
from models.fid import FID
from models.latent import generate_images
from models.precision import FP32, Precision
from server_app.tracking import Tracker


class GlobalEvaluator:
    """Draws the sample grid of a round and, if ``eval.num_samples > 0``, its FID and KID.

    ``clients`` does the same for images that clients generated with their own
    models, when parts of the model stay on the clients.

    Grids and FID samples come from the fixed noise seed ``eval.seed``, so they
    compare across rounds. FID is against as many test images as samples (for
    clients' images: as many as all clients' images together).
    """

    def __init__(
        self,
        cfg: DictConfig,
        tracker: Tracker,
        device: torch.device,
        precision: Precision = FP32,
        autoencoder=None,
    ) -> None:
        self.cfg = cfg.eval
        self.precision = precision  # of the sampling
        self.autoencoder = autoencoder  # latent diffusion: samples are decoded to pixels
        self.num_clients = int(cfg.num_clients)
        self.tracker = tracker  # the run folder's grids, and the tracking sinks'
        self.fid: FID | None = None
        if self.cfg.num_samples > 0:
            self.fid = FID(
                weights_path=self.cfg.fid_weights,
                cache_dir=self.cfg.fid_cache,
                device=device,
                batch_size=self.cfg.batch_size,
            )
            self.test_set = dataset_from_config(cfg.dataset, train=False)
            classes = cfg.dataset.get("classes")
            labels = "-classes" + "_".join(str(c) for c in classes) if classes else ""
            self.real_name = f"{cfg.dataset.name}-{cfg.dataset.image_size}px-test{labels}"
            self._reference_count = 0
            self._reference(self.cfg.num_samples)

    def _reference(self, count: int) -> None:
        """Use ``count`` test images (at most the whole test split) as FID's reference."""
        count = min(count, len(self.test_set))
        if count != self._reference_count:
            log(INFO, "FID: real statistics of %d %s images", count, self.real_name)
            self.fid.set_real(self.test_set, count, self.real_name)
            self._reference_count = count

    def __call__(self, unet: UNet2DModel, scheduler: DDPMScheduler, server_round: int) -> dict[str, float]:
        """Save ``samples/round_NNNN.png``; return ``{"fid": ..., "kid": ...}`` when FID is on."""

        def draw(count: int, show_progress: bool = False) -> torch.Tensor:
            with self.precision.autocast():
                return generate_images(
                    unet,
                    scheduler,
                    count,
                    seed=self.cfg.seed,
                    ddim_steps=self.cfg.ddim_steps,
                    batch_size=self.cfg.batch_size,
                    autoencoder=self.autoencoder,
                    show_progress=show_progress,
                )

        self.tracker.log_grid(draw(self.cfg.grid_size), server_round)
        if self.fid is None:
            return {}
        self._reference(self.cfg.num_samples)
        return self.fid.score(draw(self.cfg.num_samples, show_progress=True))

    def clients(self, samples: dict[int, np.ndarray], server_round: int) -> dict:
        """Grid, FID and KID of images the clients generated with their own models (partial exchange).

        The grid has a row per client; ``fid`` is the mean of the clients' FIDs (as
        in FedDiffuse), ``fid_clients`` each client's, and ``fid_mixture`` the FID
        of all clients' images pooled (the federation as one generator); ``kid``,
        ``kid_clients`` and ``kid_mixture`` likewise.
        """
        if not samples:
            log(INFO, "Round %d: no client sent samples; no grid or FID", server_round)
            return {}
        per_row = max(1, self.cfg.grid_size // len(samples))
        rows = [torch.from_numpy(images[:per_row]) for images in samples.values()]
        self.tracker.log_grid(torch.cat(rows), server_round, nrow=per_row)
        if self.fid is None:
            return {}
        # As many real images as all clients' images: the pooled FID compares with a global
        # model's. Sized by the configured clients, so it stays the same if one fails to reply.
        self._reference(self.cfg.num_samples * self.num_clients)
        scores, pooled = self.fid.score_groups(
            [torch.from_numpy(images[: self.cfg.num_samples]) for images in samples.values()]
        )
        out = {}
        for metric in ("fid", "kid"):
            out[metric] = float(np.mean([score[metric] for score in scores]))
            out[f"{metric}_mixture"] = pooled[metric]
            out[f"{metric}_clients"] = {str(pid): score[metric] for pid, score in zip(samples, scores)}
        return out
