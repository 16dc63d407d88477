"""TLS for the TCP side: contexts made from the user's files, and TLS
errors told in words a user can act on.

The streams themselves are trio's: the server wraps each listener in a
:class:`trio.SSLListener`, the client its connection in a
:class:`trio.SSLStream`. UDP stays plain: the standard library has no DTLS.
"""

from __future__ import annotations

import ssl

from .errors import UserError

__all__ = ["client_context", "describe_tls_error", "server_context"]


def server_context(certfile: str, keyfile: str | None, ca_certs: str | None) -> ssl.SSLContext:
    """The server's context: its certificate chain and key, and with
    ``ca_certs`` a demand for client certificates signed by those CAs
    (mutual TLS).

    Args:
      certfile: PEM file with the certificate, then any intermediates; the
          key may follow in the same file.
      keyfile: PEM file with the private key, if not in ``certfile``.
      ca_certs: PEM file of the CAs whose client certificates to accept.

    Raises:
      UserError: a file cannot be read, or does not hold what it should.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            reason = describe_tls_error(exc)
            files = f"{certfile} and {keyfile}" if keyfile else certfile
            raise UserError(f"cannot use --certfile/--keyfile {files}: {reason}") from None
        raise UserError(f"cannot read {exc.filename or certfile}: {exc.strerror}") from None
    if ca_certs is not None:
        _load_cas(context, ca_certs, "--ca-certs")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(cafile: str | None) -> ssl.SSLContext:
    """The client's context: verify the server against ``cafile``'s CAs, or
    the system's trust store without one; the name is checked too.

    Raises:
      UserError: ``cafile`` cannot be read or holds no certificate.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cafile is not None:
        _load_cas(context, cafile, "--cafile")
    return context


def _load_cas(context: ssl.SSLContext, path: str, option: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise UserError(f"cannot use {option} {path}: {describe_tls_error(exc)}") from None
    except OSError as exc:
        raise UserError(f"cannot read {option} {path}: {exc.strerror}") from None


# OpenSSL's reasons, as a user would put them.
_REASONS = {
    "WRONG_VERSION_NUMBER": "the other side does not speak TLS",
    "HTTP_REQUEST": "the other side does not speak TLS",
    "RECORD_LAYER_FAILURE": "the other side does not speak TLS",
    "PACKET_LENGTH_TOO_LONG": "the other side does not speak TLS",
    "UNEXPECTED_EOF_WHILE_READING": "the connection was closed during the TLS handshake",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the other side rejected the certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the other side does not trust the certificate's CA",
    "KEY_VALUES_MISMATCH": "the key does not match the certificate",
    "PEM_LIB": "not a PEM certificate or key",
    "NO_CERTIFICATE_OR_CRL_FOUND": "no certificate in the file",
}


def describe_tls_error(exc: ssl.SSLError) -> str:
    """One line for a TLS failure: the certificate problem for a failed
    verification ("self-signed certificate", "Hostname mismatch, ...",
    "certificate has expired"), else OpenSSL's reason in plain words."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    reason = exc.reason or ""
    return _REASONS.get(reason, reason.replace("_", " ").lower() or str(exc))
