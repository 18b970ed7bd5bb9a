"""Mixed precision (``precision=fp32|bf16|fp16``) and the training loop's GPU-minded details, checked on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from client_app.task import local_train, read_settings
from conf.schema import client_values
from feddm.simulation import simulate
from models import build_scheduler, build_unet, train_step
from models.data import LabeledImages
from models.precision import FP32, Precision, resolve_memory_format, resolve_precision
from server_app.config import ConfigError, compose_config, validate_config
from server_app.federation import client_config
from tests.conftest import MICRO_OVERRIDES

# bf16 keeps 8 bits of mantissa: its losses follow fp32's closely but not exactly. Stated tolerance of the
# loss curves below: each window's mean loss within 5 % of fp32's.
BF16_LOSS_TOLERANCE = 0.05


def test_auto_is_fp32_on_a_cpu_and_fp16_is_refused_there():
    assert resolve_precision("auto", "cpu").name == "fp32"
    assert resolve_precision("bf16", "cpu") == Precision("bf16", "cpu")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="fp8"):
        resolve_precision("fp8", "cpu")


def test_fp16_with_device_cpu_fails_before_training_naming_both():
    with pytest.raises(ConfigError, match=r"precision='fp16'.*device=cpu"):
        validate_config(compose_config(["precision=fp16", "device=cpu"]))
    validate_config(compose_config(["precision=fp16", "device=auto"]))  # decided where it runs


def test_autocast_changes_the_compute_dtype_not_the_weights():
    linear = torch.nn.Linear(4, 4)
    with Precision("bf16", "cpu").autocast():
        out = linear(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and linear.weight.dtype == torch.float32
    with FP32.autocast():
        assert linear(torch.randn(2, 4)).dtype == torch.float32


def _micro_setup(overrides=()):
    cfg = compose_config([*MICRO_OVERRIDES, *overrides])
    unet = build_unet(OmegaConf.to_container(cfg.model.unet), image_size=28, channels=1)
    scheduler = build_scheduler(OmegaConf.to_container(cfg.scheduler))
    settings = read_settings(client_config(cfg, unet, scheduler))
    return unet, scheduler, settings


def _images(count: int = 64) -> LabeledImages:
    generator = torch.Generator().manual_seed(3)
    # Smooth blobs rather than white noise, so there is something to learn.
    base = torch.nn.functional.avg_pool2d(torch.rand(count, 1, 28, 28, generator=generator), 5, 1, 2)
    return LabeledImages((base - base.mean()) / base.std() * 0.5, np.zeros(count, dtype=np.int64))


def _loss_curve(precision: Precision, windows: int = 3, steps: int = 5) -> list[float]:
    torch.manual_seed(0)
    unet, scheduler, settings = _micro_setup([f"local_steps={steps}", "lr=2e-3"])
    data = _images()
    curve = []
    for window in range(windows):
        loss, _ = local_train(
            unet, scheduler, data, np.arange(len(data)), settings, seed=window, precision=precision
        )
        curve.append(loss)
    for p in unet.parameters():
        assert p.dtype == torch.float32  # what goes on the wire
    return curve


def test_bf16_loss_curve_stays_within_the_stated_tolerance_of_fp32():
    fp32 = _loss_curve(FP32)
    bf16 = _loss_curve(Precision("bf16", "cpu"))
    assert fp32[-1] < fp32[0]  # it learns, so the curves compare something
    assert bf16 != fp32  # the autocast really ran in bf16
    for a, b in zip(fp32, bf16):
        assert abs(b - a) <= BF16_LOSS_TOLERANCE * a, (fp32, bf16)


def test_fp16_steps_go_through_a_gradient_scaler():
    """The fp16 path (GPU-only in a run) on the CPU's autocast: scaled, unscaled, clipped, stepped."""
    unet, scheduler, _ = _micro_setup()
    precision = Precision("fp16", "cpu")
    scaler = precision.grad_scaler()
    assert scaler is not None and FP32.grad_scaler() is None
    before = [p.detach().clone() for p in unet.parameters()]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    images = _images(8)._images
    for _ in range(2):
        loss = train_step(
            unet,
            scheduler,
            optimizer,
            images,
            generator=torch.Generator().manual_seed(0),
            precision=precision,
            scaler=scaler,
        )
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert scaler.get_scale() > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, unet.parameters()))


def test_train_step_returns_the_loss_on_the_device_without_reading_it():
    unet, scheduler, _ = _micro_setup()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    loss = train_step(
        unet, scheduler, optimizer, _images(4)._images, generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad


def test_node_config_precision_and_dataloader_workers_win(monkeypatch):
    """A SuperNode knows its hardware: its node config overrides what the server sent."""
    import client_app.app as app

    seen = {}

    def fake_local_train(*args, precision, dataloader_workers, **kwargs):
        seen.update(precision=precision, workers=dataloader_workers)
        raise RuntimeError("stop here")

    monkeypatch.setattr(app, "local_train", fake_local_train)
    unet, scheduler, settings = _micro_setup(["precision=fp32", "dataloader_workers=0"])
    assert settings.precision == "fp32" and settings.dataloader_workers == 0 and settings.compile is False

    class Context:
        node_config = {"precision": "bf16", "dataloader-workers": 2}

    assert app._precision(settings, Context, torch.device("cpu")).name == "bf16"


@pytest.mark.slow
def test_a_bf16_simulation_completes_with_losses_near_fp32(tmp_path, data_root):
    rows = {}
    for precision in ("fp32", "bf16"):
        cfg = compose_config([*MICRO_OVERRIDES, f"precision={precision}"])
        run_dir = simulate(cfg, tmp_path / precision)
        rows[precision] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert "precision: " + precision in (run_dir / "config.yaml").read_text()
    assert [r["round"] for r in rows["bf16"]] == [r["round"] for r in rows["fp32"]]
    for fp32, bf16 in zip(rows["fp32"], rows["bf16"]):
        assert np.isfinite(bf16["train_loss"])
        assert abs(bf16["train_loss"] - fp32["train_loss"]) <= BF16_LOSS_TOLERANCE * fp32["train_loss"]


def test_client_values_carry_the_new_settings():
    cfg = compose_config(
        ["precision=bf16", "compile=true", "dataloader_workers=3", "memory_format=channels_last"]
    )
    values = client_values(cfg)
    assert values["precision"] == "bf16" and values["compile"] is True and values["dataloader-workers"] == 3
    assert values["memory-format"] == "channels_last"


def test_memory_format_auto_is_channels_last_on_a_gpu_only():
    assert resolve_memory_format("auto", "cuda") == torch.channels_last
    assert resolve_memory_format("auto", "cpu") == torch.contiguous_format
    assert resolve_memory_format("channels_last", "cpu") == torch.channels_last
    with pytest.raises(ValueError, match="memory_format='nhwc'"):
        resolve_memory_format("nhwc", "cpu")


def test_channels_last_training_matches_contiguous_and_hands_back_contiguous_weights():
    """The layout changes how convolutions run, not what they compute: same losses and weights (to
    float rounding), and the state dict goes on the wire in the ordinary layout."""
    trained = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        unet, scheduler, settings = _micro_setup(["local_steps=3", f"memory_format={layout}"])
        data = _images(16)
        loss, _ = local_train(unet, scheduler, data, np.arange(len(data)), settings, seed=1)
        state = unet.state_dict()
        assert all(t.is_contiguous() for t in state.values()), layout
        trained[layout] = (loss, state)
    (loss_a, state_a), (loss_b, state_b) = trained.values()
    assert loss_b == pytest.approx(loss_a, rel=1e-4)
    for name, tensor in state_a.items():
        torch.testing.assert_close(state_b[name], tensor, rtol=1e-3, atol=1e-5)
