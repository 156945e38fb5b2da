"""Visitor controls an agent asks the server to enforce for its tunnel.

Basic authentication and IP allow/deny lists travel in the agent's handshake;
the server checks every visitor against them before anything reaches the agent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .._exceptions import ConfigError
from .._settings import client_setting

__all__ = ["ALLOW_HEADER", "BASIC_AUTH_HEADER", "DENY_HEADER", "VisitorPolicy", "parse_networks"]

BASIC_AUTH_HEADER = "tunnel-basic-auth"
ALLOW_HEADER = "tunnel-allow"
DENY_HEADER = "tunnel-deny"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str], *, what: str) -> tuple[Network, ...]:
    """Parse CIDR blocks (a bare address means just that address)."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{what}: {value!r} is not an IP network; write CIDR such as 203.0.113.0/24"
            ) from None
    return tuple(networks)


def _password_digest(password: str) -> bytes:
    return hashlib.sha256(password.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class VisitorPolicy:
    """Who may visit one tunnel.

    Attributes:
        user: The basic-auth user name, or None for no basic auth.
        password_digest: SHA-256 of the basic-auth password.
        allow: Visitors must come from one of these networks (empty: any).
        deny: Visitors from these networks are refused.
    """

    user: str | None = None
    password_digest: bytes = b""
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @property
    def restricts(self) -> bool:
        """Whether the policy checks anything at all."""
        return self.user is not None or bool(self.allow) or bool(self.deny)

    @classmethod
    def for_agent(
        cls, basic_auth: str | None, allow: Iterable[str], deny: Iterable[str]
    ) -> VisitorPolicy:
        """The policy an agent asks for (``basic_auth`` as ``"user:password"``)."""
        user, password = None, ""
        if basic_auth is not None:
            user, sep, password = basic_auth.partition(":")
            if not sep or not user or not password:
                raise ConfigError(f"{client_setting('basic_auth')} must be 'user:password'")
        return cls(
            user,
            _password_digest(password) if user else b"",
            parse_networks(allow, what=f"{client_setting('allow_ips')}"),
            parse_networks(deny, what=f"{client_setting('deny_ips')}"),
        )

    def handshake_headers(self) -> list[tuple[bytes, bytes]]:
        """How the agent tells the server: the password only as its SHA-256."""
        headers = []
        if self.user is not None:
            value = f"{self.user}:{self.password_digest.hex()}"
            headers.append((BASIC_AUTH_HEADER.encode(), value.encode()))
        if self.allow:
            headers.append((ALLOW_HEADER.encode(), ",".join(map(str, self.allow)).encode()))
        if self.deny:
            headers.append((DENY_HEADER.encode(), ",".join(map(str, self.deny)).encode()))
        return headers

    @classmethod
    def from_handshake(cls, values: dict[str, str]) -> VisitorPolicy:
        """The policy in an agent's handshake headers.

        Raises:
            ConfigError: A header is malformed (the agent is refused with 400).
        """
        user, digest = None, b""
        if BASIC_AUTH_HEADER in values:
            user, _, hexdigest = values[BASIC_AUTH_HEADER].rpartition(":")
            try:
                digest = bytes.fromhex(hexdigest)
            except ValueError:
                digest = b""
            if not user or len(digest) != 32:
                raise ConfigError(f"invalid {BASIC_AUTH_HEADER}: expected 'user:<sha256 hex>'")
        allow = parse_networks(_split(values.get(ALLOW_HEADER)), what=ALLOW_HEADER)
        deny = parse_networks(_split(values.get(DENY_HEADER)), what=DENY_HEADER)
        return cls(user, digest, allow, deny)

    def address_refusal(self, client: str | None) -> str | None:
        """Why the visitor's address is refused, or None if it is admitted."""
        if not self.allow and not self.deny:
            return None
        try:
            address = ipaddress.ip_address(client or "")
        except ValueError:
            return "This tunnel admits only known visitor addresses."
        if any(address in network for network in self.deny) or (
            self.allow and not any(address in network for network in self.allow)
        ):
            return f"This tunnel does not admit visitors from {address}."
        return None

    def refusal(self, client: str | None, authorization: bytes | None) -> tuple[int, str] | None:
        """Why this visitor is refused (status, message), or None to let it in."""
        address = self.address_refusal(client)
        if address is not None:
            return 403, address
        if self.user is not None and not self._authorized(authorization):
            return 401, "This tunnel needs a user name and password."
        return None

    def _authorized(self, authorization: bytes | None) -> bool:
        if authorization is None:
            return False
        scheme, _, encoded = authorization.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        # Both compared in constant time, so timing tells neither.
        user_ok = hmac.compare_digest(user.encode(), (self.user or "").encode())
        password_ok = hmac.compare_digest(_password_digest(password), self.password_digest)
        return user_ok and password_ok


def _split(value: str | None) -> list[str]:
    return [part for part in (value or "").split(",") if part.strip()]
