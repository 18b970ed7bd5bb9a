"""Where a client keeps what it carries between rounds: in memory or in a file on the node's disk.

What a client carries (FedDM-quant's error-feedback residual, partial exchange's
local parts and the client's own EMA, the ``int8_delta`` downlink's view) is one full-size copy of the model or
more. Flower keeps it in ``Context.state``, in memory, for every client a
process serves: with 1000 simulated clients of the fashion_mnist UNet, about
27 MB each, that is 27 GB. With ``client_state=disk`` each client's state lives
in safetensors files, one per round it trained in, loaded when the client is
sampled and written after it trained:

    <dir>/run-<run key>/partition-<partition id>/round-<server round>.safetensors

The run key is the server's (``run-key``: the run folder's, the same after a
resume; else the Flower run id). A message of round R reads the newest file of a
round before R (evaluation: up to R), so a resumed run, which replays the rounds
after its checkpoint, finds the state each client had at that checkpoint, and a
restarted SuperNode finds its clients' state. Files of rounds from R on that a
training message finds are left from an interrupted attempt and removed. After
writing, a client removes the files older than the newest one of a round the
server has checkpointed (``checkpointed-round``): a client keeps one or two files.

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
from dataclasses import dataclass
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


def state_folder(context: Context, configured_dir: str, run_key: str = "") -> Path:
    """The folder of this client's state files in this run (see the module docstring)."""
    folder = str(context.node_config.get("client-state-dir", "")) or configured_dir or default_state_dir()
    partition = int(context.node_config["partition-id"])
    return Path(folder).expanduser() / f"run-{run_key or context.run_id}" / f"partition-{partition}"


def round_files(folder: Path) -> dict[int, Path]:
    """The state files in ``folder``, by the server round that wrote them."""
    files = {}
    for path in folder.glob("round-*.safetensors"):
        number = path.stem.removeprefix("round-")
        if number.isdigit():
            files[int(number)] = path
    return files


@dataclass(frozen=True)
class StateRound:
    """Where a message sits in the run, for the client's state files (module docstring).

    ``server_round``: the message's round; ``run_key``: the server's name for the run
    (empty: the Flower run id); ``checkpointed``: the last round the server checkpointed.
    """

    server_round: int
    run_key: str = ""
    checkpointed: int = 0


@contextlib.contextmanager
def client_state(
    context: Context, where: str, configured_dir: str, at: StateRound, *, save: bool
) -> Iterator[RecordDict]:
    """The state to use while answering one message.

    ``where="memory"``: ``Context.state`` itself. ``"disk"``: the newest file of a
    round before ``at.server_round`` (with ``save=False``, evaluation: up to it),
    loaded into a fresh ``RecordDict`` and, if ``save`` and the block ends without
    an exception, written as this round's file (a failed training leaves the last
    good state).
    """
    if where == "memory":
        yield context.state
        return
    if where != "disk":
        raise ValueError(f"client-state={where!r} is unknown; choose one of {CLIENT_STATES}")
    folder = state_folder(context, configured_dir, at.run_key)
    files = round_files(folder)
    if save:  # training: files of this round and later are an interrupted attempt's
        for number in [n for n in files if n >= at.server_round]:
            files.pop(number).unlink(missing_ok=True)
    usable = [n for n in files if n < at.server_round or (not save and n == at.server_round)]
    state = load_state(files[max(usable)]) if usable else RecordDict()
    yield state
    if save:
        save_state(state, folder / f"round-{at.server_round}.safetensors", keep_empty=True)
        _forget_before_checkpoint(round_files(folder), at.checkpointed)


def _forget_before_checkpoint(files: dict[int, Path], checkpointed: int) -> None:
    """Remove the files older than the newest one of a checkpointed round (a resume needs no older)."""
    checkpointed_files = [n for n in files if n <= checkpointed]
    if checkpointed_files:
        for number in [n for n in files if n < max(checkpointed_files)]:
            files[number].unlink(missing_ok=True)


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


def save_state(state: RecordDict, path: Path, keep_empty: bool = False) -> None:
    """Write the FedDM records of ``state`` to ``path`` atomically.

    No records: remove the file, or with ``keep_empty`` write a file without tensors
    (a round's file that says "nothing kept", so that no older file is read instead).
    """
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
    if not tensors and not configs and not keep_empty:
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
    "StateRound",
    "client_state",
    "default_state_dir",
    "load_state",
    "round_files",
    "save_state",
    "state_folder",
]
