"""Helpers for the deployment tests: run docker/local-deployment.sh and stop all it started.

Each test checks that no process it started outlives it. The tests live in two
modules so that pytest-xdist runs them side by side (most of their time is
spent waiting on Flower's polling and heartbeats).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from feddm.processes import processes_mentioning
from tests.conftest import REPO_ROOT

LAUNCHER = REPO_ROOT / "docker" / "local-deployment.sh"


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def launch(workdir: Path, nodes: int, overrides: list[str]) -> subprocess.Popen:
    """Start the launcher with ``nodes`` SuperNodes in its own process group."""
    return subprocess.Popen(
        ["bash", str(LAUNCHER), "--nodes", str(nodes), "--workdir", str(workdir), "--", *overrides],
        cwd=workdir.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, workdir: Path, timeout: float) -> str:
    """Wait for the launcher; stop it if the test failed; nothing under ``workdir`` may outlive it."""
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:  # the test failed: stop the launcher (it stops the rest)
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while processes_mentioning(str(workdir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_mentioning(str(workdir)), "a Flower process outlived the launcher"
    return output


def run_folder_of(output: str) -> Path:
    """The run folder the launcher printed."""
    lines = [line for line in output.splitlines() if line.startswith("Run folder: ")]
    assert lines, output[-3000:]
    return Path(lines[-1].removeprefix("Run folder: "))


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class LocalFederation:
    """A SuperLink, its Fleet gateway and SuperNodes on 127.0.0.1 that a test stops and restarts one by one.

    As ``docker/local-deployment.sh`` starts them (TLS, SuperNode authentication, the
    SuperLink's database in ``workdir``), each in its own process group, logging to
    ``workdir/logs``; SuperNode ``i`` keeps its clients' state in ``workdir/state_i``.
    """

    def __init__(self, workdir: Path, nodes: int, data_root: Path) -> None:
        self.workdir, self.nodes, self.data_root = workdir, nodes, data_root
        self.creds = workdir / "credentials"
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(_env(), FLWR_HOME=str(workdir / "flwr-home"), OMP_NUM_THREADS="1")
        self.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.2"
        self.link_port, self.fleet_port = _free_port(), _free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "docker" / "generate_credentials.py"), "--out", str(self.creds),
             "--nodes", str(nodes)],
            check=True, capture_output=True, env=self.env,
        )  # fmt: skip
        (workdir / "flwr-home").mkdir(exist_ok=True)
        (workdir / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "feddm-test"\n\n[superlink.feddm-test]\naddress = "127.0.0.1:{self.link_port}"\n'
            f'root-certificates = "{self.creds / "certificates" / "ca.crt"}"\n'
        )

    def _start(self, name: str, *command: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("a")
        process = subprocess.Popen(
            command,
            env=self.env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def _wait_for_port(self, name: str, port: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not _listening(port):
            assert self.processes[name].poll() is None, (self.logs / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"{name} did not listen on {port}"
            time.sleep(0.3)

    def _tls(self) -> list[str]:
        certificates = self.creds / "certificates"
        return [
            "--ssl-ca-certfile", str(certificates / "ca.crt"), "--ssl-certfile", str(certificates / "server.pem"),
            "--ssl-keyfile", str(certificates / "server.key"),
        ]  # fmt: skip

    def start_superlink(self) -> None:
        """The SuperLink, with its state in ``workdir/superlink.db`` (a restart finds it there)."""
        self._start(
            "superlink", "flower-superlink", *self._tls(), "--enable-supernode-auth", "--isolation", "subprocess",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.link_port),
            "--database", str(self.workdir / "superlink.db"),
        )  # fmt: skip
        self._wait_for_port("superlink", self.link_port)

    def start_gateway(self) -> None:
        """The Fleet gateway, SuperNodes' only way to the SuperLink."""
        self._start(
            "gateway", "feddm-fleet-gateway", *self._tls(), "--listen", f"127.0.0.1:{self.fleet_port}",
            "--superlink", f"127.0.0.1:{self.link_port}",
        )  # fmt: skip
        self._wait_for_port("gateway", self.fleet_port)

    def register_supernodes(self) -> None:
        """Register every SuperNode's public key (once: the SuperLink's database keeps them)."""
        for i in range(1, self.nodes + 1):
            key = self.creds / "keys" / f"supernode_{i}.pub"
            subprocess.run(["flwr", "supernode", "register", str(key), "feddm-test"], check=True, env=self.env,
                           capture_output=True, timeout=120)  # fmt: skip

    def start_supernode(self, i: int) -> None:
        """SuperNode ``i`` (partition ``i - 1``), its clients' state in ``workdir/state_i``."""
        node_config = (
            f"partition-id={i - 1} num-partitions={self.nodes} device='cpu' data-root='{self.data_root}' "
            f"client-state-dir='{self.workdir / f'state_{i}'}'"
        )
        self._start(
            f"supernode_{i}", "flower-supernode", "--root-certificates", str(self.creds / "certificates" / "ca.crt"),
            "--auth-supernode-private-key", str(self.creds / "keys" / f"supernode_{i}"), "--superlink",
            f"127.0.0.1:{self.fleet_port}", "--port", str(_free_port()), "--isolation", "subprocess",
            "--node-config", node_config,
        )  # fmt: skip

    def submit(self, overrides: list[str]) -> subprocess.Popen:
        """``feddm-run superlink=feddm-test ...``, streaming the run's log to ``logs/run.log``."""
        return self._start("run", "feddm-run", "superlink=feddm-test", *overrides)

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to process ``name`` and everything it started."""
        os.killpg(self.processes[name].pid, sig)

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` and everything it started (a crash), and reap it."""
        self.signal(name, signal.SIGKILL)
        self.processes.pop(name).wait(timeout=30)

    def wait_for_clientapps(self, timeout: float = 300) -> None:
        """Wait until no SuperNode runs a ``flwr-clientapp`` (e.g. one training for a run that died)."""
        deadline = time.monotonic() + timeout
        while running := self._clientapps():
            assert time.monotonic() < deadline, f"flwr-clientapp processes {running} ran over {timeout} s"
            time.sleep(0.5)

    def _clientapps(self) -> list[int]:
        groups = {p.pid for name, p in self.processes.items() if name.startswith("supernode_")}
        found = []
        for pid in processes_mentioning("flwr-clientapp"):
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) in groups:
                    found.append(pid)
        return found

    def log_tails(self, chars: int = 2000) -> str:
        """The end of every process's log, for a failing test's message."""
        return "\n".join(
            f"--- {log.name}\n{log.read_text()[-chars:]}" for log in sorted(self.logs.glob("*.log"))
        )

    def stop_all(self) -> None:
        """Stop every process still running (SIGTERM, then SIGKILL), as the launcher does."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)  # a frozen node must be able to stop
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
        self.processes.clear()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
