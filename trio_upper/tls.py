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
    _load_cert_chain(context, certfile, keyfile)
    if ca_certs is not None:
        _load_cas(context, ca_certs, "--ca-certs")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    cafile: str | None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """The client's context: verify the server against ``cafile``'s CAs, or
    the system's trust store without one; the name is checked too. With
    ``certfile``, present that certificate to a server that asks for one
    (mutual TLS).

    Raises:
      UserError: a file cannot be read, or does not hold what it should.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cafile is not None:
        _load_cas(context, cafile, "--cafile")
    if certfile is not None:
        _load_cert_chain(context, certfile, keyfile)
    return context


def _load_cert_chain(context: ssl.SSLContext, certfile: str, keyfile: str | None) -> None:
    flags = f"--certfile {certfile}" + (f" --keyfile {keyfile}" if keyfile is not None else "")
    # OpenSSL names neither the file it could not open nor the one that held
    # no key ("PEM lib"): look at each file first, so the message can.
    for option, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if path is not None:
            _check_readable(path, option)
    if not _holds_a_certificate(certfile):
        raise UserError(f"cannot use {flags}: no PEM certificate in {certfile}")
    try:
        # Never OpenSSL's prompt for a passphrase: a server has no one to ask.
        context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except _EncryptedKey:
        raise UserError(
            f"cannot use {flags}: the private key is encrypted; trio-upper takes only a "
            "plain one (openssl pkey -in KEY -out PLAIN_KEY decrypts it)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason is None:
            # Not a key mismatch (that has a reason): the key itself.
            if keyfile is None:
                reason = f"no PEM private key in {certfile} (give it with --keyfile)"
            else:
                reason = f"no PEM private key in {keyfile}"
        else:
            reason = describe_tls_error(exc)
        raise UserError(f"cannot use {flags}: {reason}") from None
    except OSError as exc:
        # Gone, or changed, since we looked.
        raise UserError(f"cannot read {flags}: {exc.strerror}") from None


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> str:
    raise _EncryptedKey


def _check_readable(path: str, option: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"cannot read {option} {path}: {exc.strerror}") from None


def _holds_a_certificate(path: str) -> bool:
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError:
        return False
    except OSError:
        return True  # load_cert_chain will say what
    return True


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
    # A plain server sends back (the uppercase of) our ClientHello.
    "UNEXPECTED_MESSAGE": "the other side does not speak TLS",
    "HTTP_REQUEST": "the other side does not speak TLS",
    "RECORD_LAYER_FAILURE": "the other side does not speak TLS",
    "PACKET_LENGTH_TOO_LONG": "the other side does not speak TLS",
    "UNEXPECTED_EOF_WHILE_READING": "the connection was closed during the TLS handshake",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the other side rejected the certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the other side does not trust the certificate's CA",
    "KEY_VALUES_MISMATCH": "the key does not match the certificate",
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
