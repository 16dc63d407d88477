"""Certificates for the TLS tests, made by trustme and written to files, since
the server and the command line take files (``--certfile`` and the rest)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme

# The names the server's certificate carries: what a client may connect to.
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Certs:
    """Paths of PEM files: one CA and what it signed, and a CA nobody trusts."""

    ca: Path  # the CA's certificate: --cafile for clients, --ca-certs for servers
    cert: Path  # the server's certificate chain
    key: Path  # its private key
    combined: Path  # key and chain in one file (--certfile without --keyfile)
    expired: Path  # a server certificate from the same CA, expired in 2000
    other_ca: Path  # a CA that signed nothing here
    stranger: Path  # a server certificate (key included) from a CA nobody trusts
    client: Path  # a client certificate (key included) from the trusted CA
    stranger_client: Path  # a client certificate (key included) from the stranger CA
    other_key: Path  # a private key that belongs to none of these certificates
    localhost_only: Path  # a server certificate (key included) for the name localhost only


def make_certs(directory: Path) -> Certs:
    """Make every certificate the tests use, in ``directory``."""
    ca = trustme.CA()
    stranger_ca = trustme.CA()
    certs = Certs(
        ca=directory / "ca.pem",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        combined=directory / "combined.pem",
        expired=directory / "expired.pem",
        other_ca=directory / "other-ca.pem",
        stranger=directory / "stranger.pem",
        client=directory / "client.pem",
        stranger_client=directory / "stranger-client.pem",
        other_key=directory / "other-key.pem",
        localhost_only=directory / "localhost-only.pem",
    )
    ca.cert_pem.write_to_path(str(certs.ca))
    stranger_ca.cert_pem.write_to_path(str(certs.other_ca))
    server = ca.issue_cert(*SERVER_NAMES)
    server.private_key_pem.write_to_path(str(certs.key))
    server.private_key_and_cert_chain_pem.write_to_path(str(certs.combined))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(certs.cert), append=i > 0)
    long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    expired = ca.issue_cert(
        *SERVER_NAMES, not_before=long_ago - datetime.timedelta(days=1), not_after=long_ago
    )
    expired.private_key_and_cert_chain_pem.write_to_path(str(certs.expired))
    stranger_ca.issue_cert(*SERVER_NAMES).private_key_and_cert_chain_pem.write_to_path(
        str(certs.stranger)
    )
    ca.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(str(certs.client))
    stranger_ca.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(
        str(certs.stranger_client)
    )
    stranger_ca.issue_cert("unused").private_key_pem.write_to_path(str(certs.other_key))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        str(certs.localhost_only)
    )
    return certs
