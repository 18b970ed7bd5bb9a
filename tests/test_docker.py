"""Static checks of docker/: compose file, Dockerfiles (hadolint), versions, credentials."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
CREDENTIALS = DOCKER / "generate_credentials.py"
FLOWER_UID = 49999  # the `app` user of Flower's images


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_a_superlink_and_gpu_supernodes():
    services = _compose()["services"]
    supernodes = [name for name in services if name.startswith("supernode")]
    assert "superlink" in services and len(supernodes) >= 2
    for name in supernodes:
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        command = " ".join(service["command"])
        assert "--root-certificates" in command and "--auth-supernode-private-key" in command
        assert re.search(r"partition-id=\d+ num-partitions=", command)
        assert any(volume.endswith(":/data:ro") for volume in service["volumes"])
    partition_ids = [
        re.search(r"partition-id=(\d+)", " ".join(services[n]["command"])).group(1) for n in supernodes
    ]
    assert len(set(partition_ids)) == len(partition_ids)
    assert "--enable-supernode-auth" in services["superlink"]["command"]


def test_compose_references_existing_files():
    for name, service in _compose()["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
            assert (context / "pyproject.toml").is_file(), name
    for dockerfile in DOCKERFILES:
        for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile.read_text(), re.M):
            for item in source.split():
                assert (REPO_ROOT / item).exists(), f"{dockerfile.name} copies missing {item}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_flwr_version_matches_pyproject():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    (flwr_dep,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("flwr[")]
    version = re.search(r">=\s*([\d.]+)", flwr_dep).group(1)
    for dockerfile in DOCKERFILES:
        tags = re.findall(r"^FROM flwr/\w+:([\w.\-]+)", dockerfile.read_text(), re.M)
        assert tags and all(tag.split("-")[0] == version for tag in tags), dockerfile.name


def test_launcher_script_parses_and_rejects_bad_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", str(DOCKER / "local-deployment.sh")]).returncode == 0
    result = subprocess.run(
        ["bash", str(DOCKER / "local-deployment.sh"), "--nodes", "zero"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--nodes" in result.stderr


def test_credentials_script_makes_what_flower_expects(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(DOCKER / "generate_credentials.py"),
            "--out",
            str(tmp_path),
            "--nodes",
            "2",
            "--hostname",
            "superlink",
            "--hostname",
            "10.1.2.3",
        ],
        check=True,
        capture_output=True,
    )
    certs, keys = tmp_path / "certificates", tmp_path / "keys"
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert {"localhost", "superlink"} <= set(dns) and {"127.0.0.1", "10.1.2.3"} <= set(ips)
    for index in (1, 2):
        private = serialization.load_ssh_private_key((keys / f"supernode_{index}").read_bytes(), None)
        public = serialization.load_ssh_public_key((keys / f"supernode_{index}.pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (keys / f"supernode_{index}").stat().st_mode & 0o077 == 0


def _generate(out: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run generate_credentials.py into `out` (2 SuperNodes) as an operator would."""
    command = [sys.executable, str(CREDENTIALS), "--out", str(out), "--nodes", "2", *arguments]
    return subprocess.run(command, check=check, capture_output=True, text=True)


def _credentials_module():
    """docker/generate_credentials.py as a module (docker/ is no package)."""
    spec = importlib.util.spec_from_file_location("generate_credentials", CREDENTIALS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and mode."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("credentials")
    _generate(out, "--hostname", "superlink")
    return out


def _handshake(certificates: Path, server_hostname: str) -> dict:
    """A TLS handshake with a server that uses server.pem/.key, verified strictly against ca.crt.

    VERIFY_X509_STRICT is Python 3.13's default; it needs the key identifiers and
    key usages that a bare certificate lacks ("Missing Authority Key Identifier").
    """
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    client_context = ssl.create_default_context(cafile=certificates / "ca.crt")
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client's verdict is what the test checks

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with client_context.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    return tls.getpeercert()
        finally:
            server.join(timeout=10)


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", "::1", "superlink"])
def test_certificates_pass_strict_tls_verification(credentials, server_hostname):
    peer = _handshake(credentials / "certificates", server_hostname)
    assert peer["subjectAltName"]  # verified: a server without a valid certificate fails above


def test_strict_verification_still_checks_the_name(credentials):
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        _handshake(credentials / "certificates", "elsewhere.example.org")


def test_certificates_carry_the_extensions_strict_verification_needs(credentials):
    certificates = credentials / "certificates"
    ca = x509.load_pem_x509_certificate((certificates / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certificates / "server.pem").read_bytes())
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    server_aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert server_aki.key_identifier == ca_ski.digest
    assert server.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and ca_usage.crl_sign and not ca_usage.digital_signature
    server_usage = server.extensions.get_extension_for_class(x509.KeyUsage).value
    assert server_usage.digital_signature and server_usage.key_encipherment
    assert not server_usage.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]


def test_private_keys_are_never_readable_by_others(tmp_path, monkeypatch):
    """Under umask 0 and with chmod forbidden, a key is 0600 only if it was created so."""
    module = _credentials_module()

    def no_chmod(*args, **kwargs):
        raise AssertionError("a key must be created 0600, not chmod-ed after writing")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    previous = os.umask(0)
    try:
        module.generate(tmp_path, 2, ["superlink"])
    finally:
        os.umask(previous)
    private = ["certificates/ca.key", "certificates/server.key", "keys/supernode_1", "keys/supernode_2"]
    modes = {name: mode for name, (_, mode) in _snapshot(tmp_path).items()}
    assert {name: modes[name] for name in private} == dict.fromkeys(private, 0o600)
    assert all(mode & 0o022 == 0 for mode in modes.values()), modes  # nobody else can write any


def test_existing_credentials_are_kept_unless_force(tmp_path):
    _generate(tmp_path)
    before = _snapshot(tmp_path)
    refused = _generate(tmp_path, check=False)
    assert refused.returncode != 0
    assert "--force" in refused.stderr and str(tmp_path / "certificates" / "ca.key") in refused.stderr
    assert _snapshot(tmp_path) == before
    _generate(tmp_path, "--force")
    after = _snapshot(tmp_path)
    assert after.keys() == before.keys()
    assert all(after[name][0] != before[name][0] for name in before)  # a new CA and new keys
    assert {name: mode for name, (_, mode) in after.items()} == {n: m for n, (_, m) in before.items()}


def test_one_existing_file_stops_the_run_before_it_writes(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "supernode_2").write_bytes(b"a key in use")
    refused = _generate(tmp_path, check=False)
    assert refused.returncode != 0 and "supernode_2" in refused.stderr
    assert _snapshot(tmp_path) == {"keys/supernode_2": (b"a key in use", 0o666 & ~_umask())}


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_owner_uid_gives_the_containers_files_to_flower(tmp_path):
    _generate(tmp_path, "--owner-uid", str(FLOWER_UID))
    for name in _snapshot(tmp_path):
        status = (tmp_path / name).stat()
        if name.endswith("ca.key"):  # no container reads it: it stays with whoever ran the script
            assert status.st_uid == os.geteuid(), name
        else:
            assert (status.st_uid, status.st_gid) == (FLOWER_UID, FLOWER_UID), name


def test_owner_uid_without_root_fails_clearly_and_writes_nothing(tmp_path, monkeypatch):
    module = _credentials_module()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    argv = ["generate_credentials.py", "--out", str(tmp_path / "out"), "--owner-uid", str(FLOWER_UID)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="needs root.*sudo"):
        module.main()
    assert not (tmp_path / "out").exists()


def _mount(volume) -> tuple[str, str, bool]:
    """(source, target, read-only) of a compose volume, short ("src:dst:ro") or long syntax."""
    if isinstance(volume, dict):
        return str(volume.get("source", "")), volume["target"], bool(volume.get("read_only"))
    match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::([\w,]+))?", volume)
    assert match, f"unparsed volume {volume!r}"
    source, target, options = match.groups()
    return source, target, "ro" in (options or "").split(",")


def _credential_mounts(service: dict) -> dict[str, str]:
    """{file under docker/credentials: its path in the container} of a service; all read-only."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, read_only = _mount(volume)
        if "credentials" in source or "ca.key" in source:
            assert read_only, f"credential volume {volume!r} is not read-only"
            mounts[source.removeprefix("./credentials/").rstrip("/")] = target
    return mounts


def test_compose_mounts_each_container_only_its_own_credentials():
    services = _compose()["services"]
    for name, service in services.items():
        for source in _credential_mounts(service):
            # Files only: a folder would carry ca.key or the other SuperNodes' keys.
            assert "ca.key" not in source and source in {
                "certificates/ca.crt",
                "certificates/server.pem",
                "certificates/server.key",
            } | {f"keys/supernode_{i}" for i in range(1, len(services) + 1)}, (name, source)
    link = _credential_mounts(services["superlink"])
    assert set(link) == {"certificates/ca.crt", "certificates/server.pem", "certificates/server.key"}
    command = services["superlink"]["command"]
    for flag, source in [
        ("--ssl-ca-certfile", "certificates/ca.crt"),
        ("--ssl-certfile", "certificates/server.pem"),
        ("--ssl-keyfile", "certificates/server.key"),
    ]:
        assert f"{flag}={link[source]}" in command
    for name, service in services.items():
        index = re.fullmatch(r"supernode-(\d+)", name)
        if index:
            key = f"keys/supernode_{index.group(1)}"
            node = _credential_mounts(service)
            assert set(node) == {"certificates/ca.crt", key}, name
            assert f"--auth-supernode-private-key={node[key]}" in service["command"]
            assert f"--root-certificates={node['certificates/ca.crt']}" in service["command"]


def test_compose_and_readme_give_the_credentials_to_flowers_uid():
    header = (DOCKER / "compose.yaml").read_text().split("\nname:")[0]
    readme = (REPO_ROOT / "README.md").read_text()
    deploy = readme[readme.index("## Deploy on GPU nodes") :]
    deploy = deploy[: deploy.index("\n## ", 1)]
    for text in (header, deploy):
        assert f"--owner-uid {FLOWER_UID}" in text and f"chown {FLOWER_UID}:{FLOWER_UID}" in text
        assert "ca.key" in text


def _published(service: dict) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_compose_publishes_the_control_api_on_loopback_and_only_the_fleet_gateway_outside():
    services = _compose()["services"]
    (link_port,) = _published(services["superlink"])
    assert link_port.startswith("${CONTROL_API_BIND:-127.0.0.1}:"), link_port  # loopback unless overridden
    gateway = services["fleet-gateway"]
    assert _published(gateway) == ["9092:9092"] and "feddm-fleet-gateway" in gateway["entrypoint"]
    assert "--superlink=superlink:9093" in gateway["command"]
    networks = _compose()["networks"]
    assert networks["link"]["internal"] is True
    for name, service in services.items():
        if name.startswith("supernode"):
            assert not _published(service), name
            assert "--superlink=fleet-gateway:9092" in service["command"], name
            # No network in common with the SuperLink: the gateway is their only way in.
            assert not set(service["networks"]) & set(services["superlink"]["networks"]), name
    assert "--hostname fleet-gateway" in (DOCKER / "compose.yaml").read_text()  # its certificate's name
