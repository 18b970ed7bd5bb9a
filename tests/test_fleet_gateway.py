"""The Fleet gateway: SuperNodes' requests reach the SuperLink unchanged, the Control API does not."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from feddm.fleet_gateway import _parse_args, create_app


def _upstream(seen: list[tuple[str, bytes, dict]]) -> Starlette:
    """A stand-in SuperLink that records each request and streams back what it got."""

    async def handle(request: Request) -> Response:
        body = await request.body()
        seen.append((request.url.path, body, dict(request.headers)))

        async def chunks():
            yield b"reply:"
            yield body

        return StreamingResponse(chunks(), status_code=201, headers={"x-flwr-test": "kept"})

    return Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST"])])


def _call(seen, method: str, path: str, **kwargs) -> httpx.Response:
    upstream = httpx.ASGITransport(app=_upstream(seen))
    gateway = create_app("http://superlink.test", transport=upstream)

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://gw"
        ) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_fleet_requests_are_forwarded_with_body_and_signature_headers():
    seen = []
    body = bytes(range(256)) * 1000  # a message chunk: binary, 256 kB
    reply = _call(seen, "POST", "/v1/fleet/push-object", content=body, headers={"x-flwr-signature": "sig"})
    assert reply.status_code == 201 and reply.content == b"reply:" + body
    assert reply.headers["x-flwr-test"] == "kept"
    (path, got, headers), *_ = seen
    assert path == "/v1/fleet/push-object" and got == body and headers["x-flwr-signature"] == "sig"


@pytest.mark.parametrize(
    "path", ["/v1/control/start-run", "/v1/control/list-runs", "/v1/runtime/pull-messages", "/docs", "/"]
)
def test_everything_but_the_fleet_api_is_refused_before_the_superlink(path):
    seen = []
    reply = _call(seen, "POST", path, content=b"x")
    assert reply.status_code == 403 and "only Flower's Fleet API" in reply.text
    assert seen == []


def test_an_unreachable_superlink_is_a_502_naming_it():
    gateway = create_app("http://127.0.0.1:9", transport=httpx.AsyncHTTPTransport(retries=0))

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://gw"
        ) as client:
            return await client.post("/v1/fleet/pull-messages", content=b"")

    reply = asyncio.run(go())
    assert reply.status_code == 502 and "SuperLink is unreachable" in reply.text


def test_tls_options_are_all_or_insecure():
    with pytest.raises(SystemExit):
        _parse_args(["--ssl-certfile", "a.pem"])
    with pytest.raises(SystemExit):
        _parse_args(["--insecure", "--ssl-certfile", "a.pem"])
    assert _parse_args(["--insecure"]).superlink == "127.0.0.1:9093"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, process: subprocess.Popen, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert process.poll() is None, f"{process.args[0]} exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {port}")


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:  # each in its own group with what it started (SuperExec)
        os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_flwr_cli_through_the_gateway_is_refused_and_direct_works(tmp_path):
    """Real processes on 127.0.0.1: Flower's own CLI, its SuperLink, the gateway."""
    bin_dir = Path(sys.executable).parent
    env = dict(
        os.environ, FLWR_HOME=str(tmp_path / "home"), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    )
    link, gate = _free_port(), _free_port()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink.direct]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
        f'[superlink.gateway]\naddress = "127.0.0.1:{gate}"\ninsecure = true\n'
    )
    started = []

    def start(*cmd):
        started.append(
            subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stderr=subprocess.DEVNULL)
        )
        return started[-1]

    try:
        _wait_for(link, start("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link)))
        gateway_cmd = ("feddm-fleet-gateway", "--insecure", "--listen", f"127.0.0.1:{gate}")
        _wait_for(gate, start(*gateway_cmd, "--superlink", f"127.0.0.1:{link}"))
        direct = subprocess.run(["flwr", "ls", "direct"], env=env, capture_output=True, text=True, timeout=60)
        through = subprocess.run(
            ["flwr", "ls", "gateway"], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        _stop(started)
    assert direct.returncode == 0, direct.stdout + direct.stderr
    assert through.returncode != 0 and "403" in through.stdout + through.stderr
