#!/usr/bin/env python3
"""Create the TLS certificates and SuperNode keys of a FedDM deployment.

    python docker/generate_credentials.py --out creds --nodes 2 [--hostname superlink.example.org]

Writes, as Flower's TLS and SuperNode-authentication guides expect:

    creds/certificates/ca.crt, ca.key        a self-signed CA (keep ca.key private)
    creds/certificates/server.pem, .key      the SuperLink's certificate, valid for
                                             localhost, 127.0.0.1, ::1 and --hostname
    creds/keys/supernode_N, supernode_N.pub  one EC (P-384) key pair per SuperNode, OpenSSH
                                             format; register each .pub with
                                             `flwr supernode register`

Uses the `cryptography` package that Flower already depends on.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

VALIDITY = datetime.timedelta(days=365)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _certificate(subject, issuer, public_key, signing_key, extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def make_certificates(folder: Path, hostnames: list[str]) -> None:
    """A CA and a SuperLink certificate signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedDM deployment CA")])
    ca_cert = _certificate(
        ca_name,
        ca_name,
        ca_key.public_key(),
        ca_key,
        [(x509.BasicConstraints(ca=True, path_length=None), True)],
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = _certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0] if hostnames else "localhost")]),
        ca_cert.subject,
        server_key.public_key(),
        ca_key,
        [
            (x509.SubjectAlternativeName(names), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
        ],
    )
    _write(folder / "ca.key", _key_pem(ca_key), private=True)
    _write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / "server.key", _key_pem(server_key), private=True)
    _write(folder / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))


def make_supernode_keys(folder: Path, count: int) -> None:
    """One EC key pair per SuperNode, in OpenSSH format (what Flower reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(1, count + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(folder / f"supernode_{index}", private, private=True)
        _write(folder / f"supernode_{index}.pub", public + b"\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("credentials"), help="output folder")
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNode key pairs")
    parser.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="extra name or IP of the SuperLink for its certificate (repeatable)",
    )
    args = parser.parse_args()
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    make_certificates(args.out / "certificates", args.hostname)
    make_supernode_keys(args.out / "keys", args.nodes)
    print(f"credentials written to {args.out.resolve()}")


if __name__ == "__main__":
    main()
