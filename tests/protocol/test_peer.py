"""The node-to-node handshake's signatures, and the ledger that refuses a replayed one."""

from __future__ import annotations

import pytest

from tunnel._protocol.peer import (
    MAX_CLOCK_SKEW,
    accept_signature,
    dial_signature,
    signatures_match,
)
from tunnel.server._peer_serve import MAX_NONCES, NonceLedger

SECRET = "the cluster secret, 32 characters"
DIAL = {"node": "a", "target": "10.0.0.5:8000", "timestamp": 1_700_000_000, "nonce": "ab" * 16}


def test_a_dial_signature_covers_every_field_and_the_secret() -> None:
    signature = dial_signature(SECRET, **DIAL)  # type: ignore[arg-type]
    assert signatures_match(signature, dial_signature(SECRET, **DIAL))  # type: ignore[arg-type]
    for field, other in (
        ("node", "b"),
        ("target", "10.0.0.6:8000"),
        ("timestamp", 1_700_000_001),
        ("nonce", "cd" * 16),
    ):
        changed = {**DIAL, field: other}
        assert not signatures_match(signature, dial_signature(SECRET, **changed))  # type: ignore[arg-type]
    assert not signatures_match(signature, dial_signature(SECRET + "!", **DIAL))  # type: ignore[arg-type]
    assert SECRET not in signature


def test_the_target_is_compared_without_case() -> None:
    upper = {**DIAL, "target": "NODE.EXAMPLE:8000"}
    lower = {**DIAL, "target": "node.example:8000"}
    assert dial_signature(SECRET, **upper) == dial_signature(SECRET, **lower)  # type: ignore[arg-type]


def test_an_accept_signature_is_not_a_dial_signature() -> None:
    accepted = accept_signature(SECRET, "b", "ab" * 16)
    assert accepted == accept_signature(SECRET, "b", "ab" * 16)
    assert accepted != accept_signature(SECRET, "c", "ab" * 16)
    assert accepted != accept_signature(SECRET, "b", "cd" * 16)
    assert accepted != accept_signature("another secret, 32 characters...", "b", "ab" * 16)


def test_a_nonce_is_good_once_within_its_window() -> None:
    ledger = NonceLedger()
    assert ledger.first_use("n1", 1000.0)
    assert not ledger.first_use("n1", 1000.0 + MAX_CLOCK_SKEW)
    assert ledger.first_use("n2", 1000.0 + MAX_CLOCK_SKEW)
    # Past the window the signature's time is refused anyway; the nonce is forgotten.
    assert ledger.first_use("n1", 1000.0 + 2 * MAX_CLOCK_SKEW + 1)


@pytest.mark.parametrize("extra", [0, 5])
def test_the_ledger_is_bounded(extra: int) -> None:
    ledger = NonceLedger()
    for index in range(MAX_NONCES + extra):
        assert ledger.first_use(f"n{index}", 1000.0)
    assert len(ledger._seen) <= MAX_NONCES
    # The newest are still remembered.
    assert not ledger.first_use(f"n{MAX_NONCES + extra - 1}", 1000.0)
