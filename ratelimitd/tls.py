"""TLS for the gRPC port: the server's credentials, and the clients' (CLI) channel.

Files are checked with the standard library's ``ssl`` before gRPC sees them:
gRPC accepts any bytes here and fails later, per connection, with a handshake
error that names nothing; a start-up error that names the file is kinder.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """A TLS file is missing, unreadable, or not what its flag says; the message names it."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsConfigError(f"{what} {path}: {e.strerror or e}") from None


def _reason(e: OSError) -> str:
    return str(getattr(e, "reason", None) or e.strerror or e)


def _check_pair(cert: str, key: str, what: str) -> None:
    try:
        # An empty password: an encrypted key must fail here, not make OpenSSL prompt on the terminal.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=lambda: "")
    except OSError as e:  # ssl.SSLError is one
        raise TlsConfigError(
            f"{what} {cert} with key {key}: not a PEM certificate and its unencrypted private key ({_reason(e)})"
        ) from None


def _check_ca(path: str, what: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except OSError as e:
        raise TlsConfigError(f"{what} {path}: not PEM CA certificates ({_reason(e)})") from None


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """The port's TLS identity; with ``client_ca``, every client must present a certificate
    that CA issued (mTLS): a client without one cannot even complete the handshake."""
    cert_pem, key_pem = _read(cert, "--tls-cert"), _read(key, "--tls-key")
    _check_pair(cert, key, "--tls-cert")
    ca = None
    if client_ca:
        ca = _read(client_ca, "--tls-client-ca")
        _check_ca(client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client reaches the port. ``enabled`` without ``ca``: the system's trusted roots.
    ``server_name``: the name to verify the server's certificate against (and send as SNI),
    for an address the certificate does not name, like grpcurl's ``-servername``."""

    enabled: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise TlsConfigError("--tls-cert and --tls-key go together: a client certificate needs its key")

    @property
    def active(self) -> bool:
        return bool(self.enabled or self.ca or self.cert or self.server_name)

    def channel(self, address: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> grpc.aio.Channel:
        if not self.active:
            return grpc.aio.insecure_channel(address, interceptors=interceptors)
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.aio.secure_channel(address, self.credentials(), options=options, interceptors=interceptors)

    def credentials(self) -> grpc.ChannelCredentials:
        ca = cert = key = None
        if self.ca:
            ca = _read(self.ca, "--tls-ca")
            _check_ca(self.ca, "--tls-ca")
        if self.cert and self.key:
            cert, key = _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")
            _check_pair(self.cert, self.key, "--tls-cert")
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
