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

Private keys (ca.key, server.key, supernode_N) are created with mode 0600 from
the first byte. Existing credentials are kept: if any file the run would write
exists, it stops and names it; `--force` replaces them (new CA, new keys: the
SuperNodes must be registered again). Flower's images run as uid 49999, so the
files the containers read must belong to it: `sudo python ... --owner-uid 49999`
(ca.key stays with the user who runs the script; no container needs it).

Uses the `cryptography` package that Flower already depends on.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)


class CredentialsError(Exception):
    """A run that would overwrite credentials or cannot set their owner."""


def _write(path: Path, data: bytes, private: bool = False, force: bool = False, owner=None) -> None:
    """Create `path` with `data`: 0600 for a private key, 0644 (less the umask) otherwise.

    The mode is given to open(2) itself, so a key is never readable by others, not
    even between creating and chmod-ing; O_EXCL never follows a symlink planted at
    `path` and never truncates a file that appeared since the check. `force`
    removes an existing file first for the same reasons. `owner` is (uid, gid).
    """
    if force and os.path.lexists(path):
        path.unlink()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600 if private else 0o644)
    try:
        if owner is not None:
            _chown(fd, path, owner)
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def _chown(fd: int, path: Path, owner: tuple[int, int]) -> None:
    """Give the open file to `owner` before any byte is in it."""
    try:
        os.fchown(fd, *owner)
    except PermissionError as error:
        raise CredentialsError(
            f"cannot give {path} to uid {owner[0]}: changing a file's owner needs root "
            "(run with sudo, or without --owner-uid and chown the files as the README says)"
        ) from error


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _certificate(subject, issuer, public_key, signing_key, extensions) -> x509.Certificate:
    """A certificate with `extensions` plus the key identifiers strict verification wants.

    OpenSSL's X509_V_FLAG_X509_STRICT (Python 3.13's default context) rejects a
    certificate without an Authority Key Identifier and a CA without a Subject Key
    Identifier; the AKI equals the issuer's SKI, both hash the public key.
    """
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage extension that allows only the usages named."""
    usages = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    return x509.KeyUsage(**(usages | allowed))


def _subject_alternative_names(hostnames: list[str]) -> x509.SubjectAlternativeName:
    """localhost, 127.0.0.1, ::1 and each hostname (an IP address or a DNS name), once each."""
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", "::1", *hostnames]:
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        if name not in names:
            names.append(name)
    return x509.SubjectAlternativeName(names)


def certificate_files(folder: Path) -> list[Path]:
    """What make_certificates writes into `folder`."""
    return [folder / name for name in ("ca.key", "ca.crt", "server.key", "server.pem")]


def supernode_files(folder: Path, count: int) -> list[Path]:
    """What make_supernode_keys writes into `folder`."""
    return [folder / f"supernode_{i}{suffix}" for i in range(1, count + 1) for suffix in ("", ".pub")]


def make_certificates(folder: Path, hostnames: list[str], force: bool = False, owner=None) -> None:
    """A CA and a SuperLink certificate signed by it.

    `owner` (uid, gid) gets every file but ca.key: the containers read the others,
    no container needs the CA's key.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedDM deployment CA")])
    ca_cert = _certificate(
        ca_name,
        ca_name,
        ca_key.public_key(),
        ca_key,
        [
            # path_length 0: this CA signs the SuperLink's certificate, never another CA.
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (_key_usage(key_cert_sign=True, crl_sign=True), True),
        ],
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = _certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0] if hostnames else "localhost")]),
        ca_cert.subject,
        server_key.public_key(),
        ca_key,
        [
            (_subject_alternative_names(hostnames), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            # RSA key: TLS 1.2's RSA key exchange enciphers with it, ECDHE signs with it.
            (_key_usage(digital_signature=True, key_encipherment=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    pem = serialization.Encoding.PEM
    _write(folder / "ca.key", _key_pem(ca_key), private=True, force=force)
    _write(folder / "ca.crt", ca_cert.public_bytes(pem), force=force, owner=owner)
    _write(folder / "server.key", _key_pem(server_key), private=True, force=force, owner=owner)
    _write(folder / "server.pem", server_cert.public_bytes(pem), force=force, owner=owner)


def make_supernode_keys(folder: Path, count: int, force: bool = False, owner=None) -> None:
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
        _write(folder / f"supernode_{index}", private, private=True, force=force, owner=owner)
        _write(folder / f"supernode_{index}.pub", public + b"\n", force=force, owner=owner)


def _refuse_existing(paths: list[Path]) -> None:
    """Stop before writing anything if one of `paths` exists (a CA in use, registered keys)."""
    existing = [str(path) for path in paths if os.path.lexists(path)]
    if existing:
        raise CredentialsError(
            f"refusing to overwrite existing credentials: {', '.join(existing)} (left unchanged). "
            "Pass --force to replace all of them: a new CA and new keys, so every SuperNode "
            "needs the new ca.crt and its key registered again."
        )


def _owner(uid: int | None, gid: int | None) -> tuple[int, int] | None:
    """(uid, gid) for --owner-uid/--owner-gid, checked before any file is written."""
    if uid is None:
        return None
    if os.geteuid() != 0 and uid != os.geteuid():
        raise CredentialsError(
            f"--owner-uid {uid} needs root to change the files' owner: run with sudo, or drop "
            f"--owner-uid and run `sudo chown {uid}:{uid} ...` on the files as the README says"
        )
    return uid, uid if gid is None else gid


def generate(out: Path, nodes: int, hostnames: list[str], force: bool = False, owner=None) -> None:
    """All credentials of a deployment under `out`; existing ones are kept unless `force`."""
    certificates, keys = out / "certificates", out / "keys"
    if not force:
        _refuse_existing(certificate_files(certificates) + supernode_files(keys, nodes))
    make_certificates(certificates, hostnames, force=force, owner=owner)
    make_supernode_keys(keys, nodes, force=force, owner=owner)


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
    parser.add_argument("--force", action="store_true", help="replace existing credentials (default: refuse)")
    parser.add_argument(
        "--owner-uid",
        type=int,
        help="give the files the containers read to this uid (49999 for Flower's images; needs root)",
    )
    parser.add_argument("--owner-gid", type=int, help="their group (default: --owner-uid)")
    args = parser.parse_args()
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    try:
        owner = _owner(args.owner_uid, args.owner_gid)
        generate(args.out, args.nodes, args.hostname, force=args.force, owner=owner)
    except CredentialsError as error:
        sys.exit(f"generate_credentials.py: {error}")
    print(f"credentials written to {args.out.resolve()}")


if __name__ == "__main__":
    main()
