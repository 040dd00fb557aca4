from __future__ import annotations

import time
from datetime import timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bimip.core.auth import Keys, issue_client_token, issue_service_token, verify_token
from bimip.core.errors import BimipError
from bimip.core.ids import UlidGenerator, device_id_problem, eid_problem

HS = Keys("HS256", "s" * 32, "s" * 32, "i" * 32, "bimip", "bimip")


def test_client_token_round_trip() -> None:
    token = issue_client_token(HS, "alice@example.com", "phone", timedelta(minutes=5))
    principal = verify_token(HS, token, internal=False)
    assert (principal.kind, principal.eid, principal.device_id) == ("client", "alice@example.com", "phone")
    assert principal.expires_at > time.time()


def test_rs256_tokens_verify_with_the_public_key_only() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    issuer = Keys("RS256", public, private, "i" * 32, "bimip", "bimip")
    verifier = Keys("RS256", public, None, "i" * 32, "bimip", "bimip")
    token = issue_client_token(issuer, "bob@example.com", "tablet", timedelta(minutes=5))
    assert verify_token(verifier, token, internal=False).eid == "bob@example.com"
    # An HS256 token signed with the public key text (the classic confusion attack) is refused.
    forged = jwt.encode(
        {
            "iss": "bimip",
            "aud": "bimip",
            "sub": "x@y",
            "device": "d",
            "exp": int(time.time()) + 60,
            "jti": "j",
        },
        "s" * 32,
        algorithm="HS256",
    )
    with pytest.raises(BimipError) as err:
        verify_token(verifier, forged, internal=False)
    assert err.value.reason == "TOKEN_ALGORITHM"


def test_service_and_client_tokens_do_not_stand_in_for_each_other() -> None:
    client = issue_client_token(HS, "alice@example.com", "phone", timedelta(minutes=5))
    service = issue_service_token(HS, "sync")
    assert verify_token(HS, service, internal=True).kind == "service"
    with pytest.raises(BimipError):
        verify_token(HS, client, internal=True)
    with pytest.raises(BimipError):
        verify_token(HS, service, internal=False)


@pytest.mark.parametrize(
    ("eid", "ok"),
    [
        ("alice@example.com", True),
        ("a@b", True),
        ("", False),
        ("alice", False),
        ("a@b@c", False),
        ("al ice@example.com", False),
        ("alice@example.com/phone", False),
        ("a" * 251 + "@x.com", False),
        ("a" * 250 + "@x.com", True),
    ],
)
def test_eid_format(eid: str, ok: bool) -> None:
    assert (eid_problem(eid) is None) is ok


def test_device_id_limits() -> None:
    assert device_id_problem("laptop") is None
    assert device_id_problem("") == "is empty"
    assert device_id_problem("d" * 257) == "is longer than 256 bytes"


def test_ulids_sort_by_time_and_issue_order() -> None:
    gen = UlidGenerator()
    ids = [gen.new(1_700_000_000_000) for _ in range(1000)] + [gen.new(1_700_000_000_001)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 for i in ids)
    assert gen.new(1_800_000_000_000) > ids[-1]
