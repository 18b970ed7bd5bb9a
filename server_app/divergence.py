"""A warning when a round's loss jumps: the usual sign of a learning rate too large for the model.

The diffusion loss is the MSE between Gaussian noise and the UNet's prediction
of it, so a model that predicts nothing (zeros) scores about 1.0. A loss that
was well below that and then jumps far above its best, or back to about 1.0,
means training diverged. The figures in ``metrics.jsonl`` stay as they are;
the warning only says so, and what usually causes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

ZERO_PREDICTION_LOSS = 1.0  # E[eps^2] for unit Gaussian noise: the loss of predicting zeros
JUMP_FACTOR = 3.0  # a round's loss more than this times the best earlier round's
LEARNED_BELOW = 0.5  # ...or a loss back at about ZERO_PREDICTION_LOSS after one below this
WATCHED_KEYS = ("train_loss", "eval_loss")


def loss_jump(best: float, loss: float) -> bool:
    """Whether ``loss`` is far above ``best`` (the lowest loss of the earlier rounds)."""
    if not (math.isfinite(best) and math.isfinite(loss)) or best <= 0:
        return False
    collapsed = best < LEARNED_BELOW * ZERO_PREDICTION_LOSS and loss >= 0.9 * ZERO_PREDICTION_LOSS
    return loss > JUMP_FACTOR * best or collapsed


class DivergenceWatch:
    """Follows the rounds' losses and words a warning when one jumps (see the module docstring)."""

    def __init__(self, lr: float, model_name: str, latent: bool = False) -> None:
        self.lr, self.model_name, self.latent = lr, model_name, latent
        self.best: dict[str, float] = {}

    def observe(self, row: Mapping[str, object]) -> list[str]:
        """Record the round's losses; return a warning for each that jumped (empty if none)."""
        warnings = []
        for key in WATCHED_KEYS:
            loss = row.get(key)
            if not isinstance(loss, (int, float)) or not math.isfinite(loss):
                continue
            best = self.best.get(key)
            if best is not None and loss_jump(best, float(loss)):
                warnings.append(self._message(int(row.get("round", 0)), key, float(loss), best))
            self.best[key] = float(loss) if best is None else min(best, float(loss))
        return warnings

    def _message(self, server_round: int, key: str, loss: float, best: float) -> str:
        scale = (
            "latents at the wrong scale (model.autoencoder.scaling_factor: the encoded latents should have "
            "a standard deviation of about 1; clients log theirs)"
            if self.latent
            else "images outside [-1, 1] (dataset settings)"
        )
        return (
            f"round {server_round}: {key} {loss:.4f} jumped from {best:.4f} (the best earlier round; "
            f"{ZERO_PREDICTION_LOSS:.1f} is the loss of predicting zeros): training is likely diverging. "
            f"Likely causes: a learning rate too large for model={self.model_name} (lr={self.lr:g}; the model "
            f"group's default is model.lr), or {scale}. metrics.jsonl keeps the figures as they are."
        )
