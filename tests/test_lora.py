"""Fine-tuning a pretrained pipeline with LoRA adapters: only adapters travel, the merged model loads.

Offline: the "pretrained" pipeline is a micro UNet this module trains a few steps
and saves itself. The federated runs drive the real ClientApp functions through
an in-process grid (``feddm.local_grid``), recording every training message.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from flwr.app import Message
from omegaconf import OmegaConf

from client_app.adapters import adapted_unet
from client_app.app import app as feddm_app
from feddm.local_grid import LocalGrid
from models import build_unet
from models.adapters import (
    ADAPTER_MARK,
    BaseMismatchError,
    LoraSpec,
    add_lora,
    base_hash,
    exchanged_state,
    merged_unet,
)
from models.diffusion import make_optimizer, train_step
from models.pipeline import save_pipeline
from server_app.checkpoint import load_checkpoint
from server_app.config import ConfigError, compose_config, validate_config
from server_app.federation import run_federation
from strategies import RoundFailedError
from strategies.packing import unpacked
from strategies.quant import sent_names
from tests.conftest import MICRO_OVERRIDES

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _micro_unet(seed: int) -> UNet2DModel:
    cfg = compose_config(MICRO_OVERRIDES)
    torch.manual_seed(seed)
    return build_unet(OmegaConf.to_container(cfg.model.unet), image_size=28, channels=1)


def _pretrained(folder, seed: int = 0):
    """A 'pretrained' pipeline: the micro UNet after 3 steps on noise-free blobs, saved with its scheduler."""
    unet, scheduler = _micro_unet(seed), DDPMScheduler(num_train_timesteps=100)
    optimizer = make_optimizer(unet, lr=1e-3)
    images = torch.tanh(torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed)))
    for _ in range(3):
        train_step(unet, scheduler, optimizer, images, generator=torch.Generator().manual_seed(seed))
    save_pipeline(unet, scheduler, folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return _pretrained(tmp_path_factory.mktemp("pretrained") / "pipe")


def _overrides(pipeline, *extra: str) -> list[str]:
    return [*MICRO_OVERRIDES, f"model.pretrained={pipeline}", "adapter=lora", "adapter.rank=2", *extra]


def _run(cfg, run_dir, sent: list | None = None, fail_from_round: int | None = None):
    """``run_federation`` with 2 in-process clients; training messages and replies go to ``sent``."""

    def client(msg: Message, context):
        reply = feddm_app(msg, context)  # the ClientApp with its mods (SecAgg+, DP clipping)
        if msg.metadata.message_type == "evaluate":
            return reply
        if sent is not None:
            sent.append((msg, reply))
        config = msg.content.config_records.get("config", {})
        if fail_from_round is not None and int(config.get("server-round", 0)) >= fail_from_round:
            raise RuntimeError("injected failure")
        return reply

    grid = LocalGrid(range(1, 3), client)
    for partition, context in enumerate(grid.contexts.values()):
        context.node_config.update({"partition-id": partition, "num-partitions": 2})
    return run_federation(grid, cfg, run_dir)


def _arrays(message: Message) -> dict:
    """Every array a message carries, by name, from all its array records (packed fp32 ones unpacked)."""
    return {
        name: a for record in message.content.array_records.values() for name, a in unpacked(record).items()
    }


def _names(message: Message) -> set[str]:
    """The model arrays a message carries, however encoded (codes name them in one entry)."""
    return {name for record in message.content.array_records.values() for name in sent_names(record)}


def test_adapters_start_as_the_base_and_merge_into_a_plain_unet():
    unet = _micro_unet(1)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 40])
    before = unet(x, t).sample
    add_lora(unet, LoraSpec(2, 4.0, (*ATTENTION, "conv1")))
    assert torch.allclose(unet(x, t).sample, before)  # B = 0
    assert all(p.requires_grad == (ADAPTER_MARK in n) for n, p in unet.named_parameters())
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    merged = merged_unet(unet)
    assert type(merged) is UNet2DModel and not any(ADAPTER_MARK in n for n in merged.state_dict())
    torch.testing.assert_close(merged(x, t).sample, unet(x, t).sample, atol=1e-5, rtol=1e-4)


def test_only_adapters_travel_and_the_merged_pipeline_loads(
    pipeline, tmp_path, flower_task_identity, data_root
):
    sent = []
    run_dir = _run(compose_config(_overrides(pipeline)), tmp_path / "run", sent)
    base = UNet2DModel.from_pretrained(pipeline, subfolder="unet")
    adapter_names = set(exchanged_state(add_lora(_micro_unet(0), LoraSpec(2, 2.0, tuple(ATTENTION)))))
    assert sent and adapter_names
    for received, replied in sent:  # both ways, every round: the adapters, nothing of the base
        assert _names(received) == adapter_names and _names(replied) == adapter_names
    fraction = sum(np.prod(a.shape) for a in _arrays(sent[0][1]).values()) / sum(
        p.numel() for p in base.parameters()
    )
    assert fraction < 0.1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["uplink_bytes"] < 0.1 * 4 * sum(p.numel() for p in base.parameters()) * 2 for r in rows)
    fine_tuned = DDPMPipeline.from_pretrained(run_dir / "model")  # the merged model, a plain pipeline
    changed = [n for n, p in fine_tuned.unet.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(".attentions." in n or "attention" in n for n in changed)  # the targets only
    config = json.loads((run_dir / "model" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == sorted(ATTENTION)
    assert (run_dir / "model" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "combination",
    [
        ["strategy=quant", "aggregator=fedadam"],
        ["strategy=quant", "strategy.bits=4", "strategy.error_feedback=true", "client_state=disk"],
        ["strategy=prox", "aggregator=median"],
        ["privacy=dp_server", "weighting=uniform"],
        ["privacy=dp_client"],
        ["privacy=secagg"],
        ["num_clients=2", "clients_per_round=1", "strategy.downlink=int8_delta"],
    ],
    ids=[
        "int8_fedadam",
        "int4_error_feedback_disk",
        "prox_median",
        "dp_server",
        "dp_client",
        "secagg",
        "sampled",
    ],
)
def test_lora_composes(combination, pipeline, tmp_path, flower_task_identity, data_root):
    sent = []
    run_dir = _run(compose_config(_overrides(pipeline, "num_rounds=2", *combination)), tmp_path / "run", sent)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["num_aggregated"] >= 1 for r in rows)
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    base = UNet2DModel.from_pretrained(pipeline, subfolder="unet").state_dict()
    travelled = set()
    for received, replied in sent:  # whatever the encoding, nothing of the base travels
        names = {n.split("::")[0] for n in _names(received) | _names(replied)}
        assert not names & set(base), sorted(names & set(base))[:3]
        travelled |= names
    assert travelled  # (SecAgg+'s protocol messages and sampling's carry no arrays)


def test_a_node_with_another_base_is_refused(pipeline, tmp_path):
    other = _pretrained(tmp_path / "other", seed=5)
    spec = LoraSpec(2, 2.0, tuple(ATTENTION))
    served = base_hash(UNet2DModel.from_pretrained(pipeline, subfolder="unet"))
    config = {"adapter": spec.to_json(), "pretrained": str(pipeline), "base-hash": served}
    assert exchanged_state(adapted_unet(_micro_unet(9), config, {}))  # its own base: fine
    with pytest.raises(BaseMismatchError, match="has weights hash .* the server's is"):
        adapted_unet(_micro_unet(9), config, {"pretrained": str(other)})  # the node config's base wins


def test_stopped_and_resumed_equals_uninterrupted(pipeline, tmp_path, flower_task_identity, data_root):
    overrides = _overrides(pipeline, "num_rounds=3")
    through = _run(compose_config(overrides), tmp_path / "through")
    stopped = tmp_path / "stopped"
    with pytest.raises(RoundFailedError, match="injected failure"):
        _run(compose_config(overrides), stopped, fail_from_round=3)
    checkpoint, _ = load_checkpoint(stopped)
    assert checkpoint.round == 2 and all(
        ADAPTER_MARK in n for n in checkpoint.global_weights
    )  # adapters only
    resumed = _run(compose_config([f"resume={stopped}"]), None)
    metrics = [(through / "metrics.jsonl").read_text(), (resumed / "metrics.jsonl").read_text()]
    keys = ("round", "train_loss", "eval_loss", "uplink_bytes")
    rows = [[{k: json.loads(line).get(k) for k in keys} for line in m.splitlines()] for m in metrics]
    assert rows[0] == rows[1]
    w = [UNet2DModel.from_pretrained(d / "model" / "unet").state_dict() for d in (through, resumed)]
    assert all(torch.equal(w[0][n], w[1][n]) for n in w[0])


def test_lora_needs_a_pretrained_base_and_a_strategy_that_exchanges_what_trains(pipeline):
    with pytest.raises(ConfigError, match="adapter='lora' is not allowed: none without model.pretrained"):
        validate_config(compose_config([*MICRO_OVERRIDES, "adapter=lora"]))
    for strategy in ("partial", "fedddpm"):
        with pytest.raises(ConfigError, match=f"none with strategy={strategy}"):
            validate_config(compose_config(_overrides(pipeline, f"strategy={strategy}")))
    with pytest.raises(ConfigError, match="adapter.target_modules"):
        validate_config(compose_config(_overrides(pipeline, "adapter.target_modules=to_q")))
    with pytest.raises(ConfigError, match="adapter.rank"):
        validate_config(compose_config(_overrides(pipeline, "adapter.rank=0")))


def test_a_pretrained_unet_of_another_size_is_refused(pipeline, tmp_path, data_root):
    with pytest.raises(ConfigError, match="is a UNet for 28 px and 1 channels, the dataset .* is 32 px"):
        _run(compose_config([*_overrides(pipeline), "dataset=cifar10"]), tmp_path / "run")


def test_full_fine_tuning_starts_from_the_pipeline(pipeline, tmp_path, flower_task_identity, data_root):
    sent = []
    overrides = [*MICRO_OVERRIDES, f"model.pretrained={pipeline}", "model.unet.block_out_channels=[16,32]"]
    _run(compose_config([*overrides, "num_rounds=1"]), tmp_path / "run", sent)
    base = UNet2DModel.from_pretrained(pipeline, subfolder="unet").state_dict()
    # the whole UNet, the pipeline's (model.unet is not used: its config comes from it)
    received = _arrays(sent[0][0])
    assert set(received) == set(base)
    assert all(np.array_equal(received[n].numpy(), base[n].numpy()) for n in base)


def test_a_latent_pipeline_is_fine_tuned_with_lora(tmp_path, monkeypatch, flower_task_identity):
    from tests.test_data import _image_folder
    from tests.test_latent import save_tiny_autoencoder

    # A latent pipeline folder as diffusers lays it out: unet/ and scheduler/ on 8x8x4 latents, vae/.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where nodes keep their latents
    pipe = tmp_path / "ldm"
    unet = {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
        "attention_head_dim": 4,
        "layers_per_block": 1,
    }
    torch.manual_seed(0)
    save_pipeline(build_unet(unet, image_size=8, channels=4), DDPMScheduler(num_train_timesteps=100), pipe)
    save_tiny_autoencoder(pipe / "vae")
    _image_folder(tmp_path / "images", [(20, 20)] * 12)
    overrides = [
        "model=ldm",
        f"model.pretrained={pipe}",
        f"model.autoencoder.path={pipe}",
        "model.autoencoder.subfolder=vae",
        "model.autoencoder.scaling_factor=3.05",  # the random autoencoder's latents to unit variance
        "adapter=lora",
        "adapter.rank=2",
        f"adapter.target_modules=[{','.join(ATTENTION)}]",
        "dataset=image_folder",
        f"dataset.root={tmp_path / 'images'}",
        "dataset.image_size=16",
        "strategy=quant",
        "num_rounds=2",
        "local_steps=2",
        "batch_size=4",
        "eval.grid_size=4",
        "eval.ddim_steps=2",
        "eval.every=2",
    ]
    sent = []
    run_dir = _run(compose_config(overrides), tmp_path / "run", sent)
    base = UNet2DModel.from_pretrained(pipe, subfolder="unet").state_dict()
    travelled = set().union(*(_names(m) for pair in sent for m in pair))
    assert travelled and all(ADAPTER_MARK in n for n in travelled)  # adapters only, as int8 codes
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["num_aggregated"] == 2 for r in rows)
    merged = UNet2DModel.from_pretrained(run_dir / "model", subfolder="unet").state_dict()
    changed = {n for n, p in merged.items() if not torch.equal(p, base[n])}
    assert changed and all(
        any(f".{m}." in f"{n}." or n.endswith(f".{m}.weight") for m in ATTENTION) for n in changed
    )
    assert (
        run_dir / "model" / "autoencoder" / "config.json"
    ).is_file()  # the latent pipeline, decoder included
    assert (run_dir / "model" / "adapter" / "adapter_config.json").is_file()
