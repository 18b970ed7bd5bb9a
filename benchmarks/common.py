"""What every benchmark shares: the machine description and writing its results.

Each benchmark writes ``benchmarks/results/NAME.json`` (machine + results) and
``NAME.md`` (the same as a readable table).
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """CPU/GPU model, cores, memory and library versions of this machine."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": version("flwr"),
        "diffusers": version("diffusers"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def write_results(
    name: str, results: dict[str, Any], table: str, notes: str = "", folder: Path | None = None
) -> Path:
    """Write ``results/NAME.json`` and ``results/NAME.md`` (or in ``folder``); return the JSON path."""
    folder = RESULTS if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "results": results}
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    m = payload["machine"]
    header = (
        f"# {name}\n\nMachine: {m['cpu']}, {m['cores']} cores"
        + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU")
        + f"; torch {m['torch']}, flwr {m['flwr']}, diffusers {m['diffusers']}; {m['date']}\n\n"
    )
    (folder / f"{name}.md").write_text(
        header + table.strip() + "\n" + (f"\n{notes.strip()}\n" if notes else "")
    )
    return json_path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
