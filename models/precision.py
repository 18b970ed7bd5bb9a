"""Mixed precision for training, calibration and sampling: ``fp32``, ``bf16`` or ``fp16``.

The weights always stay fp32 (``torch.autocast`` runs the UNet's matmuls and
convolutions in the lower precision and keeps the parameters, the optimizer and
everything sent on the wire in fp32). ``fp16`` also needs a gradient scaler,
because its small range underflows gradients; ``bf16`` has fp32's range and
does not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision on one device: ``autocast()`` for the forward pass, ``grad_scaler()`` for fp16."""

    name: str  # fp32 | bf16 | fp16
    device_type: str  # cpu | cuda

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: plain fp32)."""
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The block's forward passes in this precision (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh gradient scaler for fp16 training, else None."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


FP32 = Precision("fp32", "cpu")


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """``auto`` is bf16 on a CUDA GPU that supports it and fp32 elsewhere; others are checked against ``device``.

    fp16 is refused on the CPU (autocast's CPU fp16 is emulated and slower than
    fp32; use bf16), and bf16 on a GPU without bf16 support (use fp16).
    """
    device = torch.device(device)
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r} is not one of {' | '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if name == "auto":
        name = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    elif name == "fp16" and not cuda:
        raise ValueError(
            "precision=fp16 needs a CUDA GPU, but the device is the CPU; use precision=bf16 on a CPU"
        )
    elif name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision=bf16: the GPU {torch.cuda.get_device_name(device)} has no bf16; use fp16"
        )
    return Precision(name, device.type)


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def resolve_memory_format(name: str, device: torch.device | str) -> torch.memory_format:
    """The layout of the UNet and the batches while training: ``auto`` is channels-last on a CUDA GPU
    (tensor-core convolutions) and contiguous on the CPU."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory_format={name!r} is not one of {' | '.join(MEMORY_FORMATS)}")
    if name == "auto":
        name = "channels_last" if torch.device(device).type == "cuda" else "contiguous"
    return torch.channels_last if name == "channels_last" else torch.contiguous_format
