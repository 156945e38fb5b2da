"""Host names: one canonical spelling for routing, and clear errors for bad ones."""

from __future__ import annotations

import pytest

import tunnel
from tunnel._protocol.hosts import (
    TargetError,
    host_from_authority,
    in_domain,
    is_valid_host,
    normalize_host,
    origin_form,
)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("MyApp.Example.COM", "myapp.example.com"),
        ("myapp.example.com.", "myapp.example.com"),
        ("  myapp.example.com  ", "myapp.example.com"),
        ("localhost", "localhost"),
        ("a-b.c0", "a-b.c0"),
        ("[::1]", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("::1", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_normalize_host(given: str, canonical: str) -> None:
    assert normalize_host(given) == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "my_app.example.com",
        "-myapp.example.com",
        "myapp-.example.com",
        "myapp..example.com",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4) + ".com",  # 260 characters
        "my app.example.com",
        "myapp.example.com:8080",
        "bücher.example",
        "[::1",
    ],
)
def test_normalize_host_rejects(bad: str) -> None:
    with pytest.raises(tunnel.ConfigError) as info:
        normalize_host(bad, what="ClientConfig.host")
    message = str(info.value)
    assert message.startswith(f"ClientConfig.host {bad!r} is not a valid host name")
    assert "myapp.example.com" in message  # an example of what is valid


def test_normalize_host_length_limit() -> None:
    labels = ["a" * 63] * 3 + ["b" * 61]  # 253 characters: the longest valid name
    longest = ".".join(labels)
    assert len(longest) == 253
    assert normalize_host(longest) == longest
    with pytest.raises(tunnel.ConfigError):
        normalize_host(longest + "b")


@pytest.mark.parametrize(
    "bad",
    [
        # A label followed by a newline: the regex's "$" matches before a final
        # newline, so this passes as a valid host.
        "myapp\n.example.com",
        # An IPv6 zone ID names a local interface; it has no place in a public
        # host name, let alone one with a space in it.
        "fe80::1%eth0 x",
    ],
)
def test_normalize_host_rejects_hidden_garbage(bad: str) -> None:
    assert not is_valid_host(bad)
    with pytest.raises(tunnel.ConfigError):
        normalize_host(bad)


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        ("myapp.example.com", "myapp.example.com"),
        ("MyApp.Example.com:8080", "myapp.example.com"),
        ("myapp.example.com.:443", "myapp.example.com"),
        ("[::1]:8000", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_host_from_authority(authority: str, host: str) -> None:
    assert host_from_authority(authority) == host


@pytest.mark.parametrize("garbage", ["", ":80", "[::1", "a b:80", "my_app.example.com", "::1"])
def test_host_from_authority_garbage_is_not_routable(garbage: str) -> None:
    assert not is_valid_host(host_from_authority(garbage))


@pytest.mark.parametrize(
    ("host", "domain", "inside"),
    [
        ("example.com", "example.com", True),
        ("myapp.example.com", "example.com", True),
        ("a.b.example.com", "example.com", True),
        ("evilexample.com", "example.com", False),
        ("example.com.evil.org", "example.com", False),
        ("example.co", "example.com", False),
        ("com", "example.com", False),
    ],
)
def test_in_domain(host: str, domain: str, inside: bool) -> None:
    assert in_domain(host, domain) is inside


@pytest.mark.parametrize(
    ("target", "method", "host", "path"),
    [
        (b"/a/b", "GET", "app.localhost", b"/a/b"),
        (b"http://app.localhost/a", "GET", "app.localhost", b"/a"),
        (b"HTTPS://App.Localhost:8443", "POST", "app.localhost:8443", b"/"),
        (b"ws://app.localhost/socket", "GET", "APP.localhost", b"/socket"),
        (b"http://[::1]:80/x", "GET", "[::1]", b"/x"),
        (b"*", "OPTIONS", "app.localhost", b"*"),
    ],
)
def test_origin_form(target: bytes, method: str, host: str, path: bytes) -> None:
    assert origin_form(target, method, host) == path


@pytest.mark.parametrize(
    ("target", "method", "host"),
    [
        # Another host than Host: the admin API's own, say.
        (b"http://localhost/_tunnel/admin/tunnels", "GET", "app.localhost"),
        (b"http://app.localhost@localhost/", "GET", "app.localhost"),
        (b"http://app.localhost/", "GET", ""),
        (b"app.localhost:443", "CONNECT", "app.localhost"),
        (b"*", "GET", "app.localhost"),
        (b"ftp://app.localhost/", "GET", "app.localhost"),
        (b"", "GET", "app.localhost"),
        (b"x", "GET", "app.localhost"),
    ],
)
def test_origin_form_refuses_other_targets(target: bytes, method: str, host: str) -> None:
    with pytest.raises(TargetError):
        origin_form(target, method, host)
