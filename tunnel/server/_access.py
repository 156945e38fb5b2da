"""Who may open which tunnel: tokens, public keys, reserved hosts, per-identity limits.

An agent proves an *identity*: a token, or an Ed25519 key. Both end up as a
digest (``sha256`` of the token, or of the key), which is all the server keeps
and compares, in constant time. Files of tokens and keys are read again when
they change on disk, so access can be granted or withdrawn without a restart
and without dropping connected agents.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .._config import ServerConfig
from .._exceptions import ConfigError
from .._protocol.handshake import signed_challenge
from .._settings import server_setting

__all__ = ["AccessControl", "Denied", "Identity", "key_digest", "token_digest"]

logger = logging.getLogger("tunnel.server")

#: How long a challenge may wait for its signature, and how many may wait.
CHALLENGE_TTL = 30.0
MAX_CHALLENGES = 10_000


def token_digest(token: str) -> bytes:
    """What the server keeps of a token: enough to compare, nothing to leak."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def key_digest(blob: bytes) -> bytes:
    """The identity of a public key (its OpenSSH wire blob)."""
    return hashlib.sha256(b"ssh-key:" + blob).digest()


class Denied(Exception):
    """The agent may not connect; ``status`` and ``reason`` go back to it."""

    def __init__(self, status: int, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        #: Seconds after which the agent may try again (a ``Retry-After``), if any.
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an agent proved to be: a digest, and how to name it in logs."""

    digest: bytes
    label: str


def _parse_ed25519(line: str, *, where: str) -> bytes:
    """The key blob of an OpenSSH ``ssh-ed25519 AAAA… comment`` line."""
    parts = line.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise ConfigError(f"{where}: expected 'ssh-ed25519 AAAA… comment', got {line[:40]!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise ConfigError(f"{where}: the key is not valid base64") from None
    if not blob.startswith(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20") or len(blob) != 51:
        raise ConfigError(f"{where}: not an Ed25519 public key")
    return blob


def _parse_token_hash(text: str, *, where: str) -> bytes:
    value = text.strip().removeprefix("sha256:")
    try:
        digest = bytes.fromhex(value)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ConfigError(
            f"{where}: expected a token's SHA-256 as 64 hex digits ('tunnel hash-token TOKEN' "
            f"prints it), got {text[:20]!r}"
        )
    return digest


def _identity_of(spec: str, *, where: str) -> bytes:
    """A reserved host's owner: ``sha256:<hex>``, an ``ssh-ed25519`` key, or a token."""
    if spec.startswith("ssh-ed25519 "):
        return key_digest(_parse_ed25519(spec, where=where))
    if spec.startswith("sha256:"):
        return _parse_token_hash(spec, where=where)
    return token_digest(spec)


class _WatchedFile:
    """A file read again whenever its modification time or size changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._stamp: tuple[int, int] | None = None

    def changed(self) -> bool:
        try:
            stat = os.stat(self.path)
        except OSError:
            return self._stamp is not None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def lines(self) -> list[tuple[int, str]]:
        with open(self.path, encoding="utf-8") as file:
            return [
                (number, line.strip())
                for number, line in enumerate(file, 1)
                if line.strip() and not line.lstrip().startswith("#")
            ]


class AccessControl:
    """The server's access rules, from :class:`~tunnel.ServerConfig`.

    Raises:
        ConfigError: A tokens or keys file cannot be read or has a bad line.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._plain = (
            None if config.tokens is None else frozenset(token_digest(t) for t in config.tokens)
        )
        self._tokens_file = None if config.tokens_file is None else _WatchedFile(config.tokens_file)
        self._keys_file = (
            None
            if config.authorized_keys_file is None
            else _WatchedFile(config.authorized_keys_file)
        )
        self._file_tokens: frozenset[bytes] = frozenset()
        self._keys: dict[bytes, str] = {}
        self._reserved = {
            host: _identity_of(owner, where=f"{server_setting('reserved_hosts')} {host!r}")
            for host, owner in config.reserved_hosts.items()
        }
        self._challenges: OrderedDict[str, float] = OrderedDict()
        self.reload(strict=True)

    @property
    def open(self) -> bool:
        """Whether any token is accepted (no tokens, no keys and no auth hook)."""
        return (
            self._plain is None
            and self._tokens_file is None
            and self._keys_file is None
            and self.config.auth is None
        )

    def reload(self, *, strict: bool = False) -> None:
        """Read the tokens and keys files again if they changed.

        A file that became unreadable or invalid keeps the previous contents in
        force (and logs why), so a half-written file never locks everyone out.
        """
        for watched, parse in (
            (self._tokens_file, self._load_tokens),
            (self._keys_file, self._load_keys),
        ):
            if watched is None or not watched.changed():
                continue
            try:
                parse(watched)
            except (OSError, ConfigError) as exc:
                if strict:
                    raise ConfigError(f"cannot use {watched.path}: {exc}") from None
                logger.error("keeping the previous contents of %s: %s", watched.path, exc)

    def _load_tokens(self, watched: _WatchedFile) -> None:
        self._file_tokens = frozenset(
            _parse_token_hash(text, where=f"{watched.path}:{number}")
            for number, text in watched.lines()
        )
        logger.info("read %d token hashes from %s", len(self._file_tokens), watched.path)

    def _load_keys(self, watched: _WatchedFile) -> None:
        keys: dict[bytes, str] = {}
        for number, text in watched.lines():
            blob = _parse_ed25519(text, where=f"{watched.path}:{number}")
            keys[blob] = " ".join(text.split()[2:]) or f"key on line {number}"
        self._keys = keys
        logger.info("read %d public keys from %s", len(keys), watched.path)

    # -- tokens ----------------------------------------------------------------

    def check_token(self, token: str) -> Identity:
        """The identity of ``token``, if this server accepts it.

        Raises:
            Denied: 401, the token is not accepted.
        """
        self.reload()
        digest = token_digest(token)
        known = (self._plain or frozenset()) | self._file_tokens
        restricted = self._plain is not None or self._tokens_file is not None
        if restricted or self._keys_file is not None:
            # Compare with every known digest, in constant time each, so the
            # answer's timing tells nothing about which tokens exist.
            accepted = False
            for candidate in known:
                accepted |= hmac.compare_digest(digest, candidate)
            if not accepted:
                raise Denied(401, "the token is not accepted by this server")
        return Identity(digest, f"token sha256:{digest.hex()[:12]}…")

    # -- public keys -----------------------------------------------------------

    def new_challenge(self) -> str:
        """A fresh single-use nonce for an agent to sign."""
        now = time.monotonic()
        while self._challenges and (
            len(self._challenges) >= MAX_CHALLENGES or next(iter(self._challenges.values())) < now
        ):
            self._challenges.popitem(last=False)
        nonce = secrets.token_urlsafe(32)
        self._challenges[nonce] = now + CHALLENGE_TTL
        return nonce

    def check_signature(self, key_line: str, nonce: str, signature: str, host: str) -> Identity:
        """The identity of an agent that signed ``nonce`` for ``host`` with its key.

        The nonce is consumed whatever the outcome, so a captured handshake
        cannot be replayed.

        Raises:
            Denied: 401, the key is unknown, the nonce unknown or expired, or
                the signature wrong.
        """
        self.reload()
        expires = self._challenges.pop(nonce, None)
        if expires is None or expires < time.monotonic():
            raise Denied(401, "the challenge is unknown or expired; connect again")
        try:
            blob = _parse_ed25519(key_line, where="the agent's key")
        except ConfigError as exc:
            raise Denied(401, str(exc)) from None
        comment = self._keys.get(blob)
        if comment is None:
            raise Denied(401, "this public key is not in the server's authorized keys")
        try:
            key = Ed25519PublicKey.from_public_bytes(blob[-32:])
            key.verify(base64.b64decode(signature, validate=True), signed_challenge(nonce, host))
        except (InvalidSignature, binascii.Error, ValueError):
            raise Denied(401, "the signature does not match the challenge") from None
        return Identity(key_digest(blob), f"key {comment}")

    @property
    def keys_enabled(self) -> bool:
        """Whether agents may authenticate with public keys."""
        return self._keys_file is not None

    # -- hosts -----------------------------------------------------------------

    def check_reserved(self, host: str, identity: Identity) -> None:
        """Raise Denied (403) if ``host`` is reserved for another identity."""
        owner = self._reserved.get(host)
        if owner is not None and not hmac.compare_digest(owner, identity.digest):
            raise Denied(403, f"host {host} is reserved for another agent")
