"""The agent's key for public-key authentication: an OpenSSH Ed25519 private key."""

from __future__ import annotations

import base64
import os

import h11
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .._exceptions import AuthenticationError, ConfigError, ServerUnreachableError
from .._protocol.handshake import (
    CHALLENGE_HEADER,
    CHALLENGE_SUFFIX,
    KEY_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    SUBPROTOCOL,
    signed_challenge,
)
from .._settings import client_setting

__all__ = ["AgentKey"]

#: A challenge is a short line; anything longer is not our server talking.
MAX_CHALLENGE = 1024


class AgentKey:
    """An Ed25519 private key, loaded from an OpenSSH key file.

    Raises:
        ConfigError: The file is not an OpenSSH Ed25519 private key, or the
            passphrase is missing or wrong.
    """

    def __init__(self, path: str | os.PathLike[str], passphrase: str | None = None) -> None:
        where = f"{client_setting('key_file')} {os.fspath(path)!r}"
        try:
            with open(path, "rb") as file:
                key = serialization.load_ssh_private_key(
                    file.read(), password=passphrase.encode() if passphrase else None
                )
        except OSError as exc:
            raise ConfigError(f"{where}: {exc.strerror or exc}") from None
        except TypeError:
            raise ConfigError(
                f"{where} is encrypted: give its passphrase ({client_setting('key_passphrase')})"
            ) from None
        except ValueError as exc:
            raise ConfigError(
                f"{where} is not a usable OpenSSH private key ({exc}); "
                "make one with 'ssh-keygen -t ed25519'"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{where} must be an Ed25519 key ('ssh-keygen -t ed25519')")
        self._key = key
        #: The public key as an ``authorized_keys`` line, without a comment.
        self.public_line = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode("ascii")
        )

    async def handshake_headers(
        self, stream: trio.abc.Stream, authority: str, control_path: str, host: str
    ) -> list[tuple[bytes, bytes]]:
        """Fetch a challenge over ``stream`` and return the headers that answer it.

        The challenge is asked for on the same connection the WebSocket then
        uses, so the exchange costs one round trip and no new connection.
        """
        nonce = await _fetch_challenge(stream, authority, control_path + CHALLENGE_SUFFIX)
        signature = base64.b64encode(self._key.sign(signed_challenge(nonce, host)))
        return [
            (KEY_HEADER.encode(), self.public_line.encode()),
            (NONCE_HEADER.encode(), nonce.encode()),
            (SIGNATURE_HEADER.encode(), signature),
        ]


async def _fetch_challenge(stream: trio.abc.Stream, authority: str, path: str) -> str:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_CHALLENGE)
    request = h11.Request(
        method="GET", target=path, headers=[("Host", authority), (CHALLENGE_HEADER, SUBPROTOCOL)]
    )
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, body = 0, bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(MAX_CHALLENGE)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_CHALLENGE:
                    raise h11.RemoteProtocolError("challenge too long")
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
    except h11.RemoteProtocolError as exc:
        raise ServerUnreachableError(f"the server's challenge was not valid HTTP: {exc}") from None
    if status == 404:
        raise AuthenticationError("the server does not accept public keys; use a token")
    if status != 200:
        raise ServerUnreachableError(f"the server answered {status} when asked for a challenge")
    return body.decode("ascii", "replace").strip()
