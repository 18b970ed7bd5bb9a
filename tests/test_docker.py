"""Static checks of docker/: compose file, Dockerfiles (hadolint), versions, credentials."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


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
