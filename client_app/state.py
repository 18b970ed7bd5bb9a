"""Where a client keeps what it carries between rounds: in memory or in a file on the node's disk.

What a client carries (FedDM-quant's error-feedback residual, partial exchange's
local parts and the client's own EMA, the ``int8_delta`` downlink's view) is one full-size copy of the model or
more. Flower keeps it in ``Context.state``, in memory, for every client a
process serves: with 1000 simulated clients of the fashion_mnist UNet, about
27 MB each, that is 27 GB. With ``client_state=disk`` each client's state lives
in a safetensors file, loaded when the client is sampled and written back after
it trained:

    <dir>/run-<Flower run id>/partition-<partition id>.safetensors

``<dir>`` is the node config's ``client-state-dir``, else the server's
``client_state_dir`` (in simulation, by default, the run folder's
``client_state/``), else ``~/.cache/feddm/client_state``. Arrays are stored as
tensors and config records as JSON in the file's metadata: nothing is pickled.
Only the keys FedDM owns move to disk; anything else in ``Context.state`` (the
SecAgg+ mod's state between its stages) stays in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from client_app.downlink import VIEW_INFO_KEY, VIEW_KEY
from client_app.partial import EMA_KEY, EMA_STEP_KEY, LOCAL_KEY
from client_app.updates import RESIDUAL_KEY
from conf.schema import CLIENT_STATES
from models.durable import replace_durably

# The state FedDM keeps for a client between rounds (record name -> kind).
FEDDM_KEYS = {
    RESIDUAL_KEY: "arrays",
    LOCAL_KEY: "arrays",
    EMA_KEY: "arrays",
    EMA_STEP_KEY: "config",
    VIEW_KEY: "arrays",
    VIEW_INFO_KEY: "config",
}
_CONFIGS = "feddm-config-records"  # metadata key: the config records, as JSON
# Metadata key: each array record's names in their order (safetensors sorts the tensors by name).
_ORDER = "feddm-array-order"
_SEPARATOR = "/"  # tensor names in the file: "<record>/<array name>"


class ClientStateError(RuntimeError):
    """A client's state file cannot be read (truncated, foreign or written by another program)."""


def default_state_dir() -> str:
    """Where a node keeps client state unless its node config or the server says otherwise."""
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "feddm" / "client_state")


def state_file(context: Context, configured_dir: str) -> Path:
    """The file of this client's state in this run (see the module docstring for the folder)."""
    folder = str(context.node_config.get("client-state-dir", "")) or configured_dir or default_state_dir()
    partition = int(context.node_config["partition-id"])
    return Path(folder).expanduser() / f"run-{context.run_id}" / f"partition-{partition}.safetensors"


@contextlib.contextmanager
def client_state(context: Context, where: str, configured_dir: str, *, save: bool) -> Iterator[RecordDict]:
    """The state to use while answering one message.

    ``where="memory"``: ``Context.state`` itself. ``"disk"``: the client's file
    loaded into a fresh ``RecordDict`` and, if ``save`` and the block ends without
    an exception, written back (a failed training leaves the last good state).
    """
    if where == "memory":
        yield context.state
        return
    if where != "disk":
        raise ValueError(f"client-state={where!r} is unknown; choose one of {CLIENT_STATES}")
    path = state_file(context, configured_dir)
    state = load_state(path)
    yield state
    if save:
        save_state(state, path)


def load_state(path: Path) -> RecordDict:
    """The FedDM records kept in ``path`` (empty if there is no file yet)."""
    if not path.exists():
        return RecordDict()
    try:
        with safe_open(path, framework="np") as file:
            metadata = file.metadata() or {}
            configs = json.loads(metadata.get(_CONFIGS, "{}"))
            order = json.loads(metadata.get(_ORDER, "{}"))
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise ClientStateError(
            f"client state file {path} cannot be read ({err}); delete it to start afresh"
        ) from err
    recorded = set(order) | set(configs) | {name.partition(_SEPARATOR)[0] for name in tensors}
    unknown = sorted(recorded - set(FEDDM_KEYS))
    if unknown:
        raise ClientStateError(f"client state file {path} holds records FedDM does not keep: {unknown}")
    listed = {f"{record}{_SEPARATOR}{name}" for record, names in order.items() for name in names}
    if listed != set(tensors):
        raise ClientStateError(f"client state file {path} lists other arrays than it holds")
    state = RecordDict()
    for record, names in order.items():  # in the order they were saved
        arrays = {name: tensors[f"{record}{_SEPARATOR}{name}"] for name in names}
        state[record] = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()})
    for record, values in configs.items():
        state[record] = ConfigRecord(values)
    return state


def save_state(state: RecordDict, path: Path) -> None:
    """Write the FedDM records of ``state`` to ``path`` atomically (no records: remove the file)."""
    tensors: dict[str, np.ndarray] = {}
    configs: dict[str, dict[str, Any]] = {}
    order: dict[str, list[str]] = {}
    for record, kind in FEDDM_KEYS.items():
        if record not in state:
            continue
        if kind == "arrays":
            order[record] = list(state.array_records[record])
            for name, array in state.array_records[record].items():
                tensors[f"{record}{_SEPARATOR}{name}"] = np.ascontiguousarray(array.numpy())
        else:
            configs[record] = dict(state.config_records[record])
    if not tensors and not configs:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file in the same folder, then an atomic rename: a crash never leaves half a state.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(descriptor)
    try:
        save_file(tensors, temporary, metadata={_CONFIGS: json.dumps(configs), _ORDER: json.dumps(order)})
        replace_durably(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


__all__ = [
    "FEDDM_KEYS",
    "ClientStateError",
    "client_state",
    "default_state_dir",
    "load_state",
    "save_state",
    "state_file",
]
