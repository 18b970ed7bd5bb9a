"""The server's copy of the global UNet and its EMA: updates, evaluation weights, checkpoints."""

from __future__ import annotations

from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from server_app.checkpoint import Checkpoint, CheckpointError


class GlobalModel:
    """The server's copy of the global UNet, its EMA, and what is saved of them."""

    def __init__(self, unet: UNet2DModel, ema_cfg: DictConfig) -> None:
        self.unet = unet
        self.ema = EMAModel(unet.parameters(), decay=float(ema_cfg.decay)) if ema_cfg.enabled else None

    def update(self, arrays: ArrayRecord) -> None:
        """Load the new global weights and take an EMA step."""
        self.unet.load_state_dict(arrays.to_torch_state_dict())
        if self.ema is not None:
            self.ema.step(self.unet.parameters())

    def evaluation_weights(self):
        """Context manager: the UNet holds the EMA weights (if on) inside the block."""
        return _EMAWeights(self)

    def checkpoint(
        self, server_round: int, strategy_name: str, strategy_state: dict | None = None
    ) -> Checkpoint:
        """The checkpoint after ``server_round``: weights, EMA, and the strategy's ``state_dict()``."""
        names = [n for n, _ in self.unet.named_parameters()]
        return Checkpoint(
            round=server_round,
            global_weights=self.unet.state_dict(),
            ema_weights=dict(zip(names, self.ema.shadow_params)) if self.ema else {},
            ema_step=self.ema.optimization_step if self.ema else 0,
            strategy_state={**(strategy_state or {}), "name": strategy_name},
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        expected = {n: tuple(t.shape) for n, t in self.unet.state_dict().items()}
        found = {n: tuple(t.shape) for n, t in checkpoint.global_weights.items()}
        if expected != found:
            raise CheckpointError("the checkpoint's weights do not match the run's model config")
        self.unet.load_state_dict(checkpoint.global_weights)
        if self.ema is not None:
            params = dict(self.unet.named_parameters())
            shapes = {n: tuple(t.shape) for n, t in checkpoint.ema_weights.items()}
            if shapes != {n: tuple(p.shape) for n, p in params.items()}:
                raise CheckpointError("the checkpoint holds no EMA weights for this model")
            state = self.ema.state_dict()
            state["shadow_params"] = [checkpoint.ema_weights[n].to(p.device) for n, p in params.items()]
            state["optimization_step"] = checkpoint.ema_step
            self.ema.load_state_dict(state)


class _EMAWeights:
    def __init__(self, model: GlobalModel) -> None:
        self.model = model

    def __enter__(self) -> UNet2DModel:
        if self.model.ema is not None:
            self.model.ema.store(self.model.unet.parameters())
            self.model.ema.copy_to(self.model.unet.parameters())
        return self.model.unet

    def __exit__(self, *exc) -> None:
        if self.model.ema is not None:
            self.model.ema.restore(self.model.unet.parameters())
