"""Tokens file parsing, authentication and role checks (no server)."""

import json

import pytest

from normserve.server.app import _is_loopback
from normserve.server.transport.auth import (
    Action,
    Authorizer,
    PermissionDenied,
    Principal,
    Unauthenticated,
    digest,
    load_tokens,
)


def _file(tmp_path, doc):
    path = tmp_path / "tokens.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


@pytest.mark.parametrize(
    "doc, message",
    [
        ("{not json", "not valid JSON"),
        ({"token": []}, '{"tokens": [...]}'),
        ({"tokens": [{"name": "a", "sha256": "AB" * 32, "role": "admin"}]}, "64 lowercase hex"),
        ({"tokens": [{"name": "a", "sha256": "ab" * 32, "role": "root"}]}, "'role' must be one of"),
        ({"tokens": [{"name": "", "sha256": "ab" * 32, "role": "admin"}]}, "'name'"),
        ({"tokens": [{"name": "a", "sha256": "ab" * 32, "role": "admin", "extra": 1}]}, "unknown field"),
        ({"tokens": [{"name": "a", "sha256": "ab" * 32, "role": "admin", "layer_prefix": 3}]}, "layer_prefix"),
    ],
)
def test_bad_tokens_files_say_what_is_wrong(tmp_path, doc, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("{", r"\{")):
        load_tokens(_file(tmp_path, doc))


def test_authenticate_accepts_only_listed_tokens(tmp_path):
    auth = Authorizer(_file(tmp_path, {"tokens": [{"name": "a", "sha256": digest("secret"), "role": "train"}]}))
    assert auth.authenticate([("authorization", "Bearer secret")]) == Principal("a", "train")
    assert auth.authenticate([("authorization", "bearer secret")]).name == "a"
    for metadata in ([], [("authorization", "Bearer nope")], [("authorization", "Basic c2VjcmV0")], [("authorization", "Bearer ")]):
        with pytest.raises(Unauthenticated):
            auth.authenticate(metadata)


def test_authentication_off_without_a_tokens_file():
    auth = Authorizer("")
    assert not auth.enabled and auth.authenticate([]) is None
    Authorizer.check(None, Action.ADMIN, "anything")  # no principal: everything allowed


@pytest.mark.parametrize(
    "role, allowed",
    [
        ("infer", {Action.READ, Action.EVAL, Action.SHARED_MEMORY}),
        ("train", {Action.READ, Action.EVAL, Action.TRAIN, Action.SHARED_MEMORY}),
        ("admin", set(Action)),
    ],
)
def test_roles_nest(role, allowed):
    for action in Action:
        if action in allowed:
            Authorizer.check(Principal("p", role), action, "x")
        else:
            with pytest.raises(PermissionDenied, match=f"has role '{role}'"):
                Authorizer.check(Principal("p", role), action, "x")


def test_layer_prefix():
    tenant = Principal("t", "admin", "team-a/")
    Authorizer.check(tenant, Action.TRAIN, "team-a/bn")
    with pytest.raises(PermissionDenied, match="team-a/"):
        Authorizer.check(tenant, Action.READ, "team-b/bn")


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("::", False), ("10.1.2.3", False)])
def test_loopback_detection_for_the_plaintext_warning(host, loopback):
    assert _is_loopback(host) is loopback
