"""LoRA adapters on a pretrained UNet (peft): what is trained and exchanged, and the merged result.

A federated fine-tuning run starts every node from the same pretrained UNet (the
base, frozen) and trains low-rank adapters only (Hu et al. 2021, LoRA: the
weight W of each targeted layer becomes W + (alpha / rank) · B A). The adapters
are what clients receive, train and send back; the base never travels, so each
node checks that its base is the server's by a hash of the base weights.

peft is imported only here and only when adapters are used (it imports
transformers: seconds per process).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

ADAPTER_NAME = "default"  # peft's adapter name: part of every adapter tensor's name
ADAPTER_MARK = ".lora_"  # adapter tensors: "<layer>.lora_A.default.weight", "<layer>.lora_B.default.weight"
# The attention projections of diffusers' Attention blocks (UNet2DModel's mid block and Attn*Block2D).
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


class BaseMismatchError(ValueError):
    """This node's pretrained base is not the server's: adapters trained on it would be merged wrongly."""


@dataclass(frozen=True)
class LoraSpec:
    """Which layers get adapters and their size.

    ``rank``: r of B (out x r) and A (r x in); ``alpha``: the scale is alpha / rank;
    ``target_modules``: module names or name suffixes (peft's matching), e.g. the
    attention projections, or ``conv1``/``conv2`` for the ResNet convolutions.
    """

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS

    def to_json(self) -> str:
        """The spec as the server sends it to clients."""
        return json.dumps({**asdict(self), "target_modules": list(self.target_modules)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraSpec:
        values = json.loads(text)
        return cls(int(values["rank"]), float(values["alpha"]), tuple(values["target_modules"]))


def load_pretrained(path: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """The UNet and scheduler of a diffusers pipeline folder (or hub id): ``unet/``, ``scheduler/``."""
    try:
        unet = UNet2DModel.from_pretrained(path, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"model.pretrained={path}: no diffusers pipeline with unet/ and scheduler/ there ({err})"
        ) from err
    return unet, scheduler


def base_hash(unet: UNet2DModel) -> str:
    """SHA-256 of the UNet's weights (names, dtypes, shapes and bytes, in name order), before adapters."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()


def check_base(unet: UNet2DModel, expected: str, where: str) -> None:
    """Refuse a base whose hash is not the server's, naming both."""
    found = base_hash(unet)
    if found != expected:
        raise BaseMismatchError(
            f"the pretrained base at {where} has weights hash {found[:16]}..., the server's is "
            f"{expected[:16]}...: every node needs the same base (same files) for adapters to merge"
        )


def add_lora(unet: UNet2DModel, spec: LoraSpec) -> UNet2DModel:
    """Add LoRA adapters (B = 0: the model starts as the base) and freeze everything else, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), init_lora_weights=True
    )
    try:
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"adapter.target_modules={list(spec.target_modules)}: {err}") from err
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(ADAPTER_MARK in name)
    return unet


def has_adapters(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` carries LoRA adapters."""
    return any(ADAPTER_MARK in name for name, _ in unet.named_parameters())


def exchanged_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a round exchanges of ``unet``: its adapters if it has any, else its whole state dict."""
    state = unet.state_dict()
    if not has_adapters(unet):
        return state
    return {name: tensor for name, tensor in state.items() if ADAPTER_MARK in name}


def load_exchanged(unet: torch.nn.Module, arrays: Mapping[str, torch.Tensor]) -> None:
    """Load what :func:`exchanged_state` names, exactly those tensors (else a clear error)."""
    expected = set(exchanged_state(unet))
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ValueError(
            f"the arrays are not this model's exchanged ones: missing {missing[:3]}, extra {extra[:3]}"
        )
    unet.load_state_dict(dict(arrays), strict=not has_adapters(unet))


def exchanged_parameters(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters among :func:`exchanged_state` (what an EMA follows), by name."""
    names = set(exchanged_state(unet))
    return [(name, p) for name, p in unet.named_parameters() if name in names]


def merged_unet(unet: UNet2DModel) -> UNet2DModel:
    """A plain UNet2DModel with the adapters folded into the base weights (W + scale · B A)."""
    from peft.tuners.lora import LoraLayer

    merged = UNet2DModel.from_config(unet.config)
    state = {}
    for name, tensor in unet.state_dict().items():
        if ADAPTER_MARK not in name:
            state[name.replace(".base_layer.", ".")] = tensor.detach().clone()
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            weight = f"{name}.weight"
            state[weight] = state[weight] + module.get_delta_weight(ADAPTER_NAME).to(state[weight].dtype)
    merged.load_state_dict(state)
    return merged.to(next(unet.parameters()).device)


def save_adapter(unet: UNet2DModel, spec: LoraSpec, base: str, folder: Path) -> Path:
    """The adapters alone, in peft's layout (``adapter_model.safetensors``, ``adapter_config.json``)."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules))
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))
    return folder
