"""The server's copy of the global UNet and its EMA: updates, evaluation weights, checkpoints."""

from __future__ import annotations

from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from models.adapters import exchanged_parameters, exchanged_state, load_exchanged
from server_app.checkpoint import Checkpoint, CheckpointError


class GlobalModel:
    """The server's copy of the global UNet, its EMA, and what is saved of them.

    What rounds exchange (``models.adapters.exchanged_state``): the whole UNet, or
    with LoRA only its adapters; the EMA follows those, and a checkpoint holds them.
    """

    def __init__(self, unet: UNet2DModel, ema_cfg: DictConfig) -> None:
        self.unet = unet
        self.names = [n for n, _ in exchanged_parameters(unet)]
        self.ema = EMAModel(self._parameters(), decay=float(ema_cfg.decay)) if ema_cfg.enabled else None

    def _parameters(self) -> list:
        return [p for _, p in exchanged_parameters(self.unet)]

    def arrays(self) -> ArrayRecord:
        """The global model as the rounds exchange it."""
        return ArrayRecord(exchanged_state(self.unet))

    def update(self, arrays: ArrayRecord) -> None:
        """Load the new global weights and take an EMA step."""
        load_exchanged(self.unet, arrays.to_torch_state_dict())
        if self.ema is not None:
            self.ema.step(self._parameters())

    def evaluation_weights(self):
        """Context manager: the UNet holds the EMA weights (if on) inside the block."""
        return _EMAWeights(self)

    def checkpoint(
        self, server_round: int, strategy_name: str, strategy_state: dict | None = None
    ) -> Checkpoint:
        """The checkpoint after ``server_round``: weights, EMA, and the strategy's ``state_dict()``."""
        return Checkpoint(
            round=server_round,
            global_weights=exchanged_state(self.unet),
            ema_weights=dict(zip(self.names, self.ema.shadow_params)) if self.ema else {},
            ema_step=self.ema.optimization_step if self.ema else 0,
            strategy_state={**(strategy_state or {}), "name": strategy_name},
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        expected = {n: tuple(t.shape) for n, t in exchanged_state(self.unet).items()}
        found = {n: tuple(t.shape) for n, t in checkpoint.global_weights.items()}
        if expected != found:
            raise CheckpointError(
                "the checkpoint's weights do not match the run's model config (or adapters)"
            )
        load_exchanged(self.unet, checkpoint.global_weights)
        if self.ema is not None:
            params = dict(exchanged_parameters(self.unet))
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
            self.model.ema.store(self.model._parameters())
            self.model.ema.copy_to(self.model._parameters())
        return self.model.unet

    def __exit__(self, *exc) -> None:
        if self.model.ema is not None:
            self.model.ema.restore(self.model._parameters())
