"""The client's side of ``adapter=lora``: its own copy of the pretrained base, checked, with adapters.

The server sends the adapter spec (``adapter``), where the base is
(``pretrained``; a SuperNode's node config ``pretrained`` wins) and the hash of
the base's weights (``base-hash``). The base is loaded once per process and
checked against the hash before any adapter is trained on it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DModel

from models.adapters import LoraSpec, add_lora, check_base, load_pretrained

ADAPTER_KEY = "adapter"  # the LoRA spec as JSON ("" or absent: the whole UNet trains)
PRETRAINED_KEY = "pretrained"  # where the base is (server's path; node config wins)
BASE_HASH_KEY = "base-hash"  # SHA-256 of the base's weights (models.adapters.base_hash)


def wants_adapter(config: Mapping[str, Any]) -> bool:
    """Whether the server asks for adapters on a pretrained base."""
    return bool(config.get(ADAPTER_KEY, ""))


@functools.lru_cache(maxsize=2)
def _checked_base(path: str, expected_hash: str) -> dict[str, torch.Tensor]:
    unet, _ = load_pretrained(path)
    check_base(unet, expected_hash, path)
    return unet.state_dict()


def adapted_unet(unet: UNet2DModel, config: Mapping[str, Any], node_config: Mapping[str, Any]) -> UNet2DModel:
    """``unet`` (built from the server's UNet config) with this node's checked base and fresh adapters."""
    path = str(node_config.get(PRETRAINED_KEY, "")) or str(config[PRETRAINED_KEY])
    unet.load_state_dict(_checked_base(path, str(config[BASE_HASH_KEY])))
    return add_lora(unet, LoraSpec.from_json(str(config[ADAPTER_KEY])))
