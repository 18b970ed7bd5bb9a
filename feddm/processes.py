"""Find and stop the processes a run started (local SuperLinks, SuperNodes, Ray).

Tests and benchmarks that start Flower processes stop them with these, pass or
fail, so nothing outlives them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def processes_mentioning(text: str) -> list[int]:
    """PIDs of processes (other than this one) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def stop_process_groups(pids: list[int], timeout: float = 20.0) -> None:
    """SIGTERM each process's group, then SIGKILL what is left after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.killpg(os.getpgid(pid), sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
