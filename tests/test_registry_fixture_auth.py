"""The authenticated registry fixtures really authenticate: the real docker-registry
asks for credentials, takes the right ones, and itself rejects forged tokens."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import httpx
import jwt
import pytest

from tests.helpers.ocibuild import build_oci_image, file_entry
from tests.helpers.procs import run
from tests.helpers.registries import READER_PASSWORD, READER_USER, token_registry
from tests.helpers.token_issuer import TokenIssuer, libtrust_key_id, parse_scope


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(reg, scope: str | None = None, auth=None) -> httpx.Response:
    params = {"service": reg.issuer.service}
    if scope:
        params["scope"] = scope
    return httpx.get(reg.issuer.realm, params=params, auth=auth or (reg.user, reg.password))


def _push_small(
    reg, tmp_path: Path, repo: str, creds: str | None
) -> subprocess.CompletedProcess[str]:
    layout = tmp_path / "layout"
    build_oci_image(layout, "v1", [[file_entry("hello", b"hello auth\n")]])
    cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if creds:
        cmd += ["--dest-creds", creds]
    return run([*cmd, f"oci:{layout}:v1", f"docker://{reg.host}/{repo}:v1"], timeout=60)




# -- basic ------------------------------------------------------------------

def test_basic_registry_asks_anonymous_clients_for_basic_credentials(registry_basic):
    r = httpx.get(f"{registry_basic.url}/v2/")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="rafs-test"'


def test_basic_registry_takes_the_right_password_only(registry_basic):
    ok = httpx.get(f"{registry_basic.url}/v2/", auth=(registry_basic.user, registry_basic.password))
    bad = httpx.get(f"{registry_basic.url}/v2/", auth=(registry_basic.user, "wrong"))
    assert ok.status_code == 200
    assert bad.status_code == 401


def test_skopeo_pushes_to_the_basic_registry_with_creds_only(registry_basic, tmp_path):
    denied = _push_small(registry_basic, tmp_path, "auth/basic", None)
    assert denied.returncode != 0
    _push_small(registry_basic, tmp_path, "auth/basic", registry_basic.creds)
    out = run(["skopeo", "inspect", "--tls-verify=false", "--creds", registry_basic.creds,
               f"docker://{registry_basic.host}/auth/basic:v1"], timeout=60, check=True)
    assert len(json.loads(out.stdout)["Layers"]) == 1


# -- token ------------------------------------------------------------------

def test_token_registry_challenges_with_the_issuer_realm_and_scope(registry_token):
    r = httpx.get(f"{registry_token.url}/v2/")
    assert r.status_code == 401
    issuer = registry_token.issuer
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="{issuer.realm}",service="{issuer.service}"')
    r = httpx.get(f"{registry_token.url}/v2/some/repo/tags/list")
    assert r.headers["WWW-Authenticate"].endswith(',scope="repository:some/repo:pull"')


def test_token_from_the_issuer_opens_the_registry(registry_token):
    answer = _token(registry_token, "repository:auth/tok:pull,push")
    assert answer.status_code == 200
    body = answer.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == registry_token.issuer.expires_in
    claims = registry_token.issuer.decode(body["token"])
    assert {"iss", "sub", "aud", "exp", "nbf", "iat", "jti"} <= claims.keys()
    assert claims["access"] == [
        {"type": "repository", "name": "auth/tok", "actions": ["pull", "push"]}]
    r = httpx.get(f"{registry_token.url}/v2/", headers=_bearer(body["token"]))
    assert r.status_code == 200
    # push scope lets the client start an upload
    r = httpx.post(f"{registry_token.url}/v2/auth/tok/blobs/uploads/",
                   headers=_bearer(body["token"]))
    assert r.status_code == 202


def test_issuer_refuses_wrong_password_and_anonymous(registry_token):
    assert _token(registry_token, auth=(registry_token.user, "wrong")).status_code == 401
    assert httpx.get(registry_token.issuer.realm).status_code == 401
    assert _token(registry_token, auth=("nobody", "x")).status_code == 401


def test_registry_rejects_a_token_whose_claims_were_changed(registry_token):
    token = _token(registry_token, "repository:auth/tok:pull").json()["token"]
    header, claims, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    payload["access"][0]["actions"] = ["pull", "push"]
    forged_claims = base64.urlsafe_b64encode(
        json.dumps(payload).encode()).rstrip(b"=").decode()
    forged = f"{header}.{forged_claims}.{signature}"
    url = f"{registry_token.url}/v2/auth/tok/blobs/uploads/"
    assert httpx.post(url, headers=_bearer(forged)).status_code == 401
    # the unforged token is fine for what it grants, and only that
    assert httpx.get(f"{registry_token.url}/v2/", headers=_bearer(token)).status_code == 200
    assert httpx.post(url, headers=_bearer(token)).status_code == 401


def test_registry_rejects_a_token_signed_by_another_key(registry_token, tmp_path):
    with TokenIssuer({"x": "y"}, tmp_path, service=registry_token.issuer.service,
                     issuer=registry_token.issuer.issuer) as stranger:
        token = stranger.issue("alice", [{"type": "repository", "name": "auth/tok",
                                          "actions": ["pull"]}])
    assert httpx.get(f"{registry_token.url}/v2/", headers=_bearer(token)).status_code == 401


def test_registry_rejects_a_bad_signature(registry_token):
    token = _token(registry_token).json()["token"]
    header, claims, signature = token.split(".")
    sig = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    sig[5] ^= 0x01
    bad = f"{header}.{claims}.{base64.urlsafe_b64encode(bytes(sig)).rstrip(b'=').decode()}"
    assert httpx.get(f"{registry_token.url}/v2/", headers=_bearer(bad)).status_code == 401


def test_expired_token_is_refused_by_the_registry(registry_token):
    issuer = registry_token.issuer
    fresh = issuer.issue(registry_token.user, expires_in=30)
    expired = issuer.issue(registry_token.user, expires_in=2, now=time.time() - 3)
    assert httpx.get(f"{registry_token.url}/v2/", headers=_bearer(fresh)).status_code == 200
    assert httpx.get(f"{registry_token.url}/v2/", headers=_bearer(expired)).status_code == 401


def test_short_expires_in_is_what_the_issuer_hands_out(registry_token, monkeypatch):
    monkeypatch.setattr(registry_token.issuer, "expires_in", 2)
    body = _token(registry_token).json()
    assert body["expires_in"] == 2
    r = httpx.get(f"{registry_token.url}/v2/", headers=_bearer(body["token"]))
    assert r.status_code == 200


def test_reader_gets_pull_but_not_push(registry_token):
    body = _token(registry_token, "repository:auth/tok:pull,push",
                  auth=(READER_USER, READER_PASSWORD)).json()
    claims = registry_token.issuer.decode(body["token"])
    assert claims["access"][0]["actions"] == ["pull"]
    r = httpx.post(f"{registry_token.url}/v2/auth/tok/blobs/uploads/",
                   headers=_bearer(body["token"]))
    assert r.status_code == 401


def test_oauth_password_grant_issues_a_token(registry_token):
    r = httpx.post(registry_token.issuer.realm, data={
        "grant_type": "password", "username": registry_token.user,
        "password": registry_token.password, "service": registry_token.issuer.service,
        "scope": "repository:auth/tok:pull", "client_id": "rafs-test"})
    assert r.status_code == 200
    token = r.json()["access_token"]
    assert httpx.get(f"{registry_token.url}/v2/", headers=_bearer(token)).status_code == 200
    bad = httpx.post(registry_token.issuer.realm, data={
        "grant_type": "password", "username": registry_token.user, "password": "nope",
        "service": registry_token.issuer.service})
    assert bad.status_code == 401


def test_skopeo_pushes_and_inspects_through_the_token_flow(registry_token, tmp_path):
    before = len(registry_token.issuer.requests)
    denied = _push_small(registry_token, tmp_path, "auth/skopeo", None)
    assert denied.returncode != 0
    _push_small(registry_token, tmp_path, "auth/skopeo", registry_token.creds)
    out = run(["skopeo", "inspect", "--tls-verify=false", "--creds", registry_token.creds,
               f"docker://{registry_token.host}/auth/skopeo:v1"], timeout=60, check=True)
    assert len(json.loads(out.stdout)["Layers"]) == 1
    issued = [r for r in registry_token.issuer.requests[before:] if r.status == 200]
    assert any("repository:auth/skopeo:pull,push" in r.scopes for r in issued)
    assert all(r.user == registry_token.user for r in issued)


def test_kid_header_tokens_are_verified_too():
    with token_registry(key_header="kid") as reg:
        body = _token(reg).json()
        header = jwt.get_unverified_header(body["token"])
        assert header["kid"] == reg.issuer.key_id and "x5c" not in header
        assert httpx.get(f"{reg.url}/v2/", headers=_bearer(body["token"])).status_code == 200
        header_b64 = base64.urlsafe_b64encode(json.dumps(
            {**header, "kid": "AAAA:" + reg.issuer.key_id[5:]}).encode()).rstrip(b"=").decode()
        other_kid = ".".join([header_b64, *body["token"].split(".")[1:]])
        assert httpx.get(f"{reg.url}/v2/", headers=_bearer(other_kid)).status_code == 401


def test_libtrust_key_id_has_twelve_groups_of_four():
    from cryptography.hazmat.primitives.asymmetric import ec

    kid = libtrust_key_id(ec.generate_private_key(ec.SECP256R1()).public_key())
    groups = kid.split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)


@pytest.mark.parametrize(("scope", "parsed"), [
    ("repository:a/b:pull,push", {"type": "repository", "name": "a/b",
                                  "actions": ["pull", "push"]}),
    ("repository:a:", {"type": "repository", "name": "a", "actions": []}),
    ("nonsense", None),
])
def test_parse_scope(scope, parsed):
    assert parse_scope(scope) == parsed
