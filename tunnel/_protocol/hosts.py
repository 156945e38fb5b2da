"""Host names: the key that routes a visitor's request to one tunnel.

Every host that enters the registry or is looked up in it passes through
:func:`normalize_host`, so routing compares one canonical spelling.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from .._exceptions import ConfigError

__all__ = [
    "TargetError",
    "host_from_authority",
    "in_domain",
    "is_valid_host",
    "normalize_host",
    "origin_form",
]

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def is_valid_host(host: str) -> bool:
    """Whether ``host`` (already lower-case, no port) is a DNS name or IP literal."""
    if not host or len(host) > 253:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return getattr(address, "scope_id", None) is None
    return all(_LABEL.fullmatch(label) for label in host.split("."))


def normalize_host(host: str, *, what: str = "host") -> str:
    """Lower-case ``host`` and drop a trailing dot; raise ConfigError if invalid."""
    canonical = host.strip().lower().removesuffix(".")
    if canonical.startswith("[") and canonical.endswith("]"):
        canonical = canonical[1:-1]
    if not is_valid_host(canonical):
        raise ConfigError(
            f"{what} {host!r} is not a valid host name: use letters, digits, '-' and '.', "
            "such as 'myapp.example.com'"
        )
    return canonical


# Every request is routed by its Host header, and checking a name costs ~15 µs
# (ipaddress raising for every name that is not an IP literal); a server sees
# few distinct ones, and the cache's bound keeps a visitor sending random names
# from growing it.
@functools.lru_cache(maxsize=4096)
def host_from_authority(authority: str) -> str:
    """The routing key of a ``Host`` header: lower-case, port and trailing dot dropped.

    Invalid input gives a string that no tunnel can claim (it is not a valid
    host), so it routes to "unknown host" rather than raising.
    """
    text = authority.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        text = text[1:end] if end != -1 else text
    elif ":" in text:
        text = text.rsplit(":", 1)[0]
    text = text.removesuffix(".")
    # Only a valid host name may route: anything else (such as "[tcp:20000]",
    # the registry's key of a TCP tunnel) must not match a registry key.
    return text if is_valid_host(text) else ""


def in_domain(host: str, domain: str) -> bool:
    """Whether ``host`` is ``domain`` or a name under it."""
    return host == domain or host.endswith("." + domain)


class TargetError(ValueError):
    """A request target the server refuses (400); the message is for the visitor."""


_SCHEMES = (b"http", b"https", b"ws", b"wss")


def origin_form(target: bytes, method: str, host: str) -> bytes:
    """The origin-form (``/path``) of a request's target, without its query.

    Every path check (the admin API, the challenge, the control path) and the
    agent see only this form: an absolute-form target
    (``http://localhost/_tunnel/admin``, RFC 9112 section 3.2.2) would slip
    past a check of the path's start and reach an agent as it was sent. Its
    authority must name the host of the ``Host`` header (``host``), whose
    tunnel the request goes to.

    Raises:
        TargetError: Any other form, or an authority other than ``host``.
    """
    if target.startswith(b"/"):
        return target
    if target == b"*" and method == "OPTIONS":
        # Asterisk-form names no path, so no path check can be dodged with it.
        return target
    scheme, separator, rest = target.partition(b"://")
    if not separator or scheme.lower() not in _SCHEMES:
        raise TargetError("The request's target must be a path that starts with '/'.")
    authority, _, path = rest.partition(b"/")
    named = host_from_authority(authority.decode("latin-1"))
    if not named or named != host_from_authority(host):
        raise TargetError(
            f"The request's target names {authority.decode('latin-1')} "
            f"but its Host header {host or '(none)'}: send them alike, or a path alone."
        )
    return b"/" + path
