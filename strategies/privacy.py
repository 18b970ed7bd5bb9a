"""Central differential privacy with fixed clipping, on Flower's DP functions.

* ``dp_server``: the server clips each client's update Δ = w_local − w_global to
  L2 norm ``clipping_norm`` (``compute_clip_model_update``);
* ``dp_client``: the strategy sends ``clipping_norm`` and each client's
  ``fixedclipping_mod`` (Flower's) clips its own update before sending it.

Either way the server adds Gaussian noise of standard deviation
``noise_multiplier · clipping_norm / k`` to the mean of the k updates it averages
(``compute_stdv``, ``add_gaussian_noise_inplace``). This is what Flower's
``DifferentialPrivacy{Server,Client}SideFixedClipping`` wrappers do; it runs in
the FedDM strategy's hooks so that every reply is still checked (and a
malformed one left out) before it is clipped and averaged; client-side, an
update over the clipping norm is left out. The noise assumes
equal client weights, as Flower's does; FedDM weights by ``num-examples``, so
with unequal partitions the noise is smaller than the nominal calibration
unless ``weighting=uniform``. ``strategies.privacy_budget`` accounts the epsilon
the noisy means spend, where the settings allow one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_inplace,
    compute_clip_model_update,
    compute_stdv,
    get_norm,
)

from strategies.codec import PayloadError


@dataclass(frozen=True)
class CentralDP:
    """Fixed-clipping central DP settings of a run."""

    mode: str
    clipping_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if self.mode not in ("dp_server", "dp_client"):
            raise ValueError(f"privacy={self.mode!r} is not dp_server or dp_client")
        if not self.clipping_norm > 0 or self.noise_multiplier < 0:
            raise ValueError("privacy needs clipping_norm > 0 and noise_multiplier >= 0")

    def check_clipped(self, reply: ArrayRecord, global_arrays: ArrayRecord) -> None:
        """Client-side mode: the update must already be within the clipping norm.

        A client without Flower's clipping mod would otherwise slip an unclipped
        update into the mean. Raises ``PayloadError``.
        """
        if self.mode != "dp_client":
            return
        update = [
            reply[n].numpy().astype(np.float64) - global_arrays[n].numpy() for n in global_arrays.keys()
        ]
        norm = get_norm(update)
        if norm > self.clipping_norm * (1 + 1e-4):
            raise PayloadError(
                f"update norm {norm:.4g} exceeds clipping_norm {self.clipping_norm:g}: not clipped"
            )

    def clip(self, reply: ArrayRecord, global_arrays: ArrayRecord) -> ArrayRecord:
        """The reply with its update clipped to ``clipping_norm`` (server-side mode)."""
        if self.mode != "dp_server":
            return reply
        names = list(global_arrays.keys())
        values = [reply[n].numpy().copy() for n in names]
        reference = [global_arrays[n].numpy() for n in names]
        if all(np.array_equal(v, r) for v, r in zip(values, reference)):
            return reply  # no update to clip (Flower's clipping divides by its norm)
        compute_clip_model_update(values, reference, self.clipping_norm)
        return ArrayRecord({n: Array(np.asarray(v)) for n, v in zip(names, values)})

    def add_noise(self, mean: ArrayRecord, num_averaged: int) -> ArrayRecord:
        """The mean of ``num_averaged`` clipped updates with Gaussian noise of std z · C / num_averaged."""
        names = list(mean.keys())
        values = [mean[n].numpy().copy() for n in names]
        add_gaussian_noise_inplace(
            values, compute_stdv(self.noise_multiplier, self.clipping_norm, num_averaged)
        )
        return ArrayRecord({n: Array(np.asarray(v)) for n, v in zip(names, values)})


__all__ = ["CentralDP", "KEY_CLIPPING_NORM"]
