"""The network boundary of a deployment: a gateway that serves only Flower's Fleet API.

Flower 1.42's SuperLink serves its Control API (``flwr run``, ``flwr ls``, ``flwr
supernode register``), its Fleet API (SuperNodes) and its Runtime API (the
ServerApp) on one HTTP port. Whoever reaches that port and trusts the CA can
submit code that the SuperLink and every SuperNode run; SuperNode authentication
covers the Fleet API only. So the SuperLink listens on 127.0.0.1 and this gateway,
the only port published to SuperNodes, forwards requests under ``/v1/fleet/``
to it and answers everything else with 403 before it reaches the SuperLink.

    feddm-fleet-gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 \\
        --ssl-certfile server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.crt

Requests and responses are streamed through unchanged (SuperNode signatures are
headers, message chunks are bodies), so the gateway holds no message in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
# Per-hop headers (RFC 9110 section 7.6.1) and the ones httpx and uvicorn set anew.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)
UPSTREAM_TIMEOUT_S = 120.0  # longer than a SuperNode's own 30 s request time-out

log = logging.getLogger("feddm.fleet_gateway")


def _forwarded_headers(headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_HEADERS]


def create_app(
    superlink_url: str,
    verify: ssl.SSLContext | bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """A Starlette app forwarding ``/v1/fleet/*`` to ``superlink_url`` and refusing the rest.

    Args:
        superlink_url: the SuperLink's base URL, e.g. ``https://127.0.0.1:9093``.
        verify: how to verify the SuperLink's certificate (an SSL context with the CA).
        transport: httpx transport to the SuperLink (tests pass an in-memory one).
    """
    client = httpx.AsyncClient(
        base_url=superlink_url.rstrip("/"), verify=verify, timeout=UPSTREAM_TIMEOUT_S, transport=transport
    )

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(FLEET_PREFIX):
            log.warning("refused %s %s from %s: not the Fleet API", request.method, path, request.client)
            return PlainTextResponse(
                f"{path} is not served here: this gateway forwards only Flower's Fleet API "
                f"({FLEET_PREFIX}); the Control API listens on the SuperLink's host only",
                status_code=403,
            )
        upstream = client.build_request(
            request.method,
            path,
            params=request.url.query,
            headers=_forwarded_headers(request.headers),
            content=request.stream(),
        )
        try:
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as err:
            log.warning("SuperLink unreachable for %s: %s", path, err)
            return PlainTextResponse(f"the SuperLink is unreachable: {err}", status_code=502)
        return StreamingResponse(
            _raw(response),
            status_code=response.status_code,
            headers=dict(_forwarded_headers(response.headers)),
            background=BackgroundTask(response.aclose),
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


async def _raw(response: httpx.Response) -> AsyncIterator[bytes]:
    # Raw bytes: any content-encoding travels on to the SuperNode as the SuperLink sent it.
    async for chunk in response.aiter_raw():
        yield chunk


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SystemExit(f"an address is HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="feddm-fleet-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="0.0.0.0:9092", help="HOST:PORT SuperNodes connect to")
    parser.add_argument("--superlink", default="127.0.0.1:9093", help="HOST:PORT of the SuperLink")
    parser.add_argument("--ssl-certfile", help="certificate presented to SuperNodes (the SuperLink's)")
    parser.add_argument("--ssl-keyfile", help="its private key")
    parser.add_argument("--ssl-ca-certfile", help="CA that signed the SuperLink's certificate")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP on both sides (testing only)")
    args = parser.parse_args(argv)
    tls = [args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile]
    if args.insecure and any(tls):
        parser.error("--insecure and --ssl-* exclude each other")
    if not args.insecure and not all(tls):
        parser.error("give --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile, or --insecure")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the gateway until interrupted."""
    import uvicorn  # Flower's own HTTP server

    args = _parse_args(argv)
    host, port = _host_port(args.listen)
    link_host, link_port = _host_port(args.superlink)
    scheme = "http" if args.insecure else "https"
    verify = False if args.insecure else ssl.create_default_context(cafile=args.ssl_ca_certfile)
    app = create_app(f"{scheme}://{link_host}:{link_port}", verify=verify)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded request
    log.info(
        "serving the Fleet API on %s:%d, forwarded to %s://%s:%d", host, port, scheme, link_host, link_port
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
