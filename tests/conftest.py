"""Shared fixtures: the local data root, a micro UNet config, Flower message helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from flwr.app import Message, Metadata, RecordDict
from flwr.app.message.message import make_message

REPO_ROOT = Path(__file__).resolve().parents[1]
# Fashion-MNIST in torchvision's layout; CI and developers have it in ../shared/data.
DATA_ROOT = Path(os.environ.get("FEDDM_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


def pytest_configure(config) -> None:
    """Node-local caches (data splits, latents) go to a folder of this test session, not the user's ~/.cache.

    Set in the environment, so that Ray workers and Flower processes started by the tests inherit it.
    """
    if "FEDDM_TEST_CACHE" not in os.environ:  # once, in the controller; xdist workers inherit it
        config.feddm_cache = tempfile.mkdtemp(prefix="feddm-cache-")
        os.environ["FEDDM_TEST_CACHE"] = os.environ["XDG_CACHE_HOME"] = config.feddm_cache


def pytest_unconfigure(config) -> None:
    if getattr(config, "feddm_cache", None):  # the process that made it, after every worker is done
        shutil.rmtree(config.feddm_cache, ignore_errors=True)


# A UNet of a few thousand parameters and a couple of steps: fast on 2 CPU cores.
MICRO_MODEL = [
    "model.unet.block_out_channels=[8,16]",
    "model.unet.norm_num_groups=4",
    "model.unet.attention_head_dim=4",
]
SHORT_RUN = [
    "num_rounds=2",
    "local_steps=2",
    "batch_size=4",
    "client_eval_max_examples=8",
    "eval.grid_size=4",
    "eval.ddim_steps=3",
    f"dataset.root={DATA_ROOT}",
]
MICRO_OVERRIDES = MICRO_MODEL + SHORT_RUN


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "FashionMNIST" / "raw").is_dir():
        pytest.fail(f"Fashion-MNIST not found in {DATA_ROOT}; set FEDDM_DATA_ROOT")
    return DATA_ROOT


def reply(content: RecordDict, src_node_id: int, message_type: str = "train") -> Message:
    """A reply Message as the server receives it from node ``src_node_id``."""
    metadata = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=src_node_id,
        dst_node_id=0,
        reply_to_message_id=uuid.uuid4().hex,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )
    return make_message(metadata=metadata, content=content)


@pytest.fixture
def flower_task_identity():
    """Messages built outside a running app need run, node and task ids (Flower reads them globally)."""
    from flwr.supercore.task_identity import TaskIdentity

    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
