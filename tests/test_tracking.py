"""Experiment tracking: metrics.jsonl unchanged, TensorBoard events read back, W&B (fake and real offline)."""

from __future__ import annotations

import io
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from server_app.config import compose_config, group_options
from server_app.run_folder import RunFolder
from server_app.tracking import GRID_TAG, Tracker, build_tracker, flatten_scalars, wandb_run_id

ROWS = [
    {
        "round": 1,
        "train_loss": 0.5,
        "uplink_bytes": 1000,
        "phase": "train",
        "resumed": False,
        "note": None,
        "fid_clients": {"0": 12.3, "1": 45.6},
        "wall_time_s": 1.25,
    },
    {"round": 2, "train_loss": 0.25, "uplink_bytes": 2000, "fid": 7.5, "wall_time_s": 2.5},
]
EXPECTED = {  # tag -> [(step, value)] of ROWS: no round, phase, resumed or note
    "train_loss": [(1, 0.5), (2, 0.25)],
    "uplink_bytes": [(1, 1000.0), (2, 2000.0)],
    "wall_time_s": [(1, 1.25), (2, 2.5)],
    "fid_clients/0": [(1, 12.3)],
    "fid_clients/1": [(1, 45.6)],
    "fid": [(2, 7.5)],
}


def images(count: int = 4, channels: int = 1, size: int = 8) -> torch.Tensor:
    """Distinct uint8 images, so a wrong grid cannot match the PNG by chance."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=generator)


def read_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0})  # 0 = keep all
    accumulator.Reload()
    return accumulator


def scalars(accumulator) -> dict[str, list[tuple[int, float]]]:
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def png_pixels(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return np.asarray(image.convert("RGB"))


def test_flatten_scalars_keeps_numbers_and_nests_dicts():
    row = {
        "a": 1,
        "b": 2.5,
        "flag": True,
        "s": "x",
        "n": None,
        "l": [1, 2],
        "np": np.float64(0.5),
        "fid_clients": {"0": 12.3, "deep": {"x": 4}},
    }
    assert dict(flatten_scalars(row)) == {
        "a": 1.0,
        "b": 2.5,
        "np": 0.5,
        "fid_clients/0": 12.3,
        "fid_clients/deep/x": 4.0,
    }


def test_tensorboard_scalars_and_grid_are_read_back(tmp_path):
    run = RunFolder(tmp_path / "run")
    tracker = build_tracker({"name": "tensorboard"}, run)
    tracker.log_round(ROWS[0])
    png = tracker.log_grid(images(), server_round=2, nrow=2)
    tracker.log_round(ROWS[1])
    tracker.close()

    # metrics.jsonl: exactly what RunFolder.append_metrics writes, nested dict and all
    lines = run.metrics_file.read_text(encoding="utf-8").splitlines()
    assert lines == [json.dumps(row, sort_keys=True) for row in ROWS]
    assert png == run.samples / "round_0002.png" and png.is_file()

    events = read_events(run.path / "tensorboard")
    got = scalars(events)
    assert set(got) == set(EXPECTED)
    for tag, points in EXPECTED.items():
        assert [step for step, _ in got[tag]] == [step for step, _ in points], tag
        assert [value for _, value in got[tag]] == pytest.approx([value for _, value in points]), tag

    assert events.Tags()["images"] == [GRID_TAG]
    (image,) = events.Images(GRID_TAG)
    # 2 x 2 grid of 8 px images with make_grid's 2 px padding: 2 * 8 + 3 * 2 = 22 px,
    # upscaled 12x (the smallest whole factor reaching 256 px): 264 px
    assert (image.step, image.width, image.height) == (2, 264, 264)
    np.testing.assert_array_equal(png_pixels(image.encoded_image_string), png_pixels(png))


def test_resumed_run_appends_and_hides_the_redone_rounds(tmp_path):
    run = RunFolder(tmp_path / "run")
    with build_tracker({"name": "tensorboard"}, run) as tracker:
        for server_round in (1, 2, 3):  # interrupted after round 3, checkpoint of round 2
            tracker.log_round({"round": server_round, "train_loss": float(server_round)})
    with build_tracker({"name": "tensorboard"}, run, resumed_after=2) as tracker:
        for server_round in (3, 4):
            tracker.log_round({"round": server_round, "train_loss": 10.0 * server_round})

    assert len(list((run.path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert scalars(read_events(run.path / "tensorboard"))["train_loss"] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
        (4, 40.0),
    ]


@pytest.mark.parametrize("tracking_cfg", [{"name": "none"}, None])
def test_none_writes_the_run_folder_only(tmp_path, tracking_cfg):
    run = RunFolder(tmp_path / "run")
    tracker = build_tracker(tracking_cfg, run)
    tracker.log_round(ROWS[0])
    tracker.log_grid(images(), server_round=1)
    tracker.close()
    assert run.read_metrics() == [ROWS[0]]
    assert (run.samples / "round_0001.png").is_file()
    assert sorted(p.name for p in run.path.iterdir()) == ["metrics.jsonl", "samples"]


def test_unknown_sink_names_the_option_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"tracking\.name.*none \| tensorboard \| wandb.*'mlflow'"):
        build_tracker({"name": "mlflow"}, RunFolder(tmp_path / "run"))


def test_close_twice_closes_each_sink_once(tmp_path):
    class Counting:
        closed = 0

        def metrics(self, step, scalars): ...

        def image(self, tag, step, image): ...

        def close(self):
            self.closed += 1

    sink = Counting()
    tracker = Tracker(RunFolder(tmp_path / "run"), [sink])
    tracker.close()
    tracker.close()
    assert sink.closed == 1
    board = build_tracker({"name": "tensorboard"}, RunFolder(tmp_path / "board"))
    board.close()
    board.close()


def test_group_options_name_themselves_and_build(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    assert group_options("tracking") == ("none", "tensorboard", "wandb")
    for option in group_options("tracking"):
        cfg = OmegaConf.to_container(compose_config([f"tracking={option}"]).tracking)
        assert cfg["name"] == option
        build_tracker(cfg, RunFolder(tmp_path / option)).close()
    assert _tracking("wandb") == {"name": "wandb", "project": "feddm", "entity": None, "mode": "offline"}


def _tracking(option: str) -> dict:
    """The ``tracking=option`` config as the run gets it."""
    return OmegaConf.to_container(compose_config([f"tracking={option}"]).tracking)


class FakeWandb(types.ModuleType):
    """Records what the W&B sink calls."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.init_kwargs: list[dict] = []
        self.logged: list[tuple[dict, int]] = []
        self.finished = self.torn_down = 0
        fake = self

        class Image:
            def __init__(self, data):
                self.data = data

        class Run:
            def log(self, data, step=None):
                fake.logged.append((data, step))

            def finish(self):
                fake.finished += 1

        self.Image, self._run = Image, Run()

    def init(self, **kwargs):
        self.init_kwargs.append(kwargs)
        return self._run

    def teardown(self):
        self.torn_down += 1


def test_wandb_sink_calls(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = RunFolder(tmp_path / "2025-01-01_00-00-00_vanilla")
    config = {"num_rounds": 2, "strategy": {"name": "vanilla"}}
    tracker = build_tracker(
        {"name": "wandb", "project": "p", "entity": "team", "mode": "online"}, run, config
    )
    png = tracker.log_grid(images(channels=3), server_round=1)
    tracker.log_round(ROWS[0])
    tracker.close()
    tracker.close()

    assert fake.init_kwargs == [
        dict(
            project="p",
            entity="team",
            mode="online",
            dir=str(run.path),
            config=config,
            name="2025-01-01_00-00-00_vanilla",
            resume="allow",
            id=wandb_run_id(run.path),
        )
    ]
    (grid, grid_step), (metrics, metrics_step) = fake.logged
    assert grid_step == metrics_step == 1 and list(grid) == [GRID_TAG]
    assert grid[GRID_TAG].data.dtype == np.uint8 and grid[GRID_TAG].data.shape == (
        264,
        264,
        3,
    )  # upscaled 22 px grid
    np.testing.assert_array_equal(grid[GRID_TAG].data, png_pixels(png))
    assert metrics == pytest.approx(
        {tag: points[0][1] for tag, points in EXPECTED.items() if points[0][0] == 1}
    )
    assert (fake.finished, fake.torn_down) == (1, 1)

    build_tracker({"name": "wandb"}, run).close()  # defaults: project feddm, no entity, offline
    assert {k: fake.init_kwargs[1][k] for k in ("project", "entity", "mode")} == {
        "project": "feddm",
        "entity": None,
        "mode": "offline",
    }


def test_wandb_run_id_is_stable_per_folder_name(tmp_path):
    a, b = tmp_path / "x" / "2025-01-01_00-00-00_vanilla", tmp_path / "y" / "2025-01-01_00-00-00_vanilla"
    assert wandb_run_id(a) == wandb_run_id(b) != wandb_run_id(tmp_path / "2025-01-01_00-00-01_vanilla")
    assert len(wandb_run_id(a)) == 16 and wandb_run_id(a).isalnum()


def test_missing_wandb_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match=r"tracking=wandb.*pip install 'feddm\[wandb\]'"):
        build_tracker({"name": "wandb"}, RunFolder(tmp_path / "run"))


def test_missing_tensorboard_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"tracking=tensorboard.*pip install 'feddm\[tracking\]'"):
        build_tracker({"name": "tensorboard"}, RunFolder(tmp_path / "run"))


def wandb_children() -> list[str]:
    """Command lines of this process's child processes that run W&B (its service)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # the process ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and "wandb" in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_wandb_offline_run_for_real(tmp_path, monkeypatch):
    import wandb  # noqa: F401 - in the test extra; fails here rather than in the tracker if missing

    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))  # nothing written to the home folder
    run = RunFolder(tmp_path / "2025-01-01_00-00-00_vanilla")
    cfg = _tracking("wandb")
    tracker = build_tracker(cfg, run, {"num_rounds": 2})
    tracker.log_grid(images(), server_round=1)
    tracker.log_round(ROWS[0])
    tracker.close()
    tracker.close()

    run_id = wandb_run_id(run.path)
    (offline,) = (run.path / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
    (media,) = (offline / "files" / "media" / "images").glob(f"{GRID_TAG}_*.png")  # the grid, as saved
    np.testing.assert_array_equal(png_pixels(media), png_pixels(run.samples / "round_0001.png"))
    assert wandb_children() == []
    assert run.read_metrics() == [ROWS[0]]


def test_a_run_with_tracking_tensorboard_logs_every_round_and_grid(tmp_path, flower_task_identity, data_root):
    """The run loop sends its metrics rows and grids through the tracker (in-process clients)."""
    from server_app.config import compose_config
    from tests.conftest import MICRO_OVERRIDES
    from tests.test_resume_strategies import _run

    run_dir = _run(compose_config([*MICRO_OVERRIDES, "tracking=tensorboard"]), tmp_path / "run")
    events = read_events(run_dir / "tensorboard")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in scalars(events)["train_loss"]] == [r["round"] for r in rows] == [1, 2]
    assert [value for _, value in scalars(events)["eval_loss"]] == pytest.approx(
        [r["eval_loss"] for r in rows]
    )
    assert [image.step for image in events.Images(GRID_TAG)] == [1, 2]
