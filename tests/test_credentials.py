"""Unit tests of csi_oci/credentials.py: registry credentials from CSI secrets."""

from __future__ import annotations

import base64
import json

import pytest

from csi_oci.errors import InvalidArgument
from csi_oci.spec.credentials import Credentials, credentials_from_secrets
from csi_oci.spec.reference import parse_reference

PASSWORD = "s3cr3t-P@ss:with:colons"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def dockerconfigjson(auths: dict) -> dict[str, str]:
    return {".dockerconfigjson": json.dumps({"auths": auths})}


def creds_for(secrets: dict[str, str], image: str) -> Credentials | None:
    return credentials_from_secrets(secrets, parse_reference(image))


def user_for(auths: dict, image: str) -> str | None:
    """Which entry matched, by the user name each test entry carries."""
    entries = {key: {"username": user, "password": "pw"} for key, user in auths.items()}
    found = creds_for(dockerconfigjson(entries), image)
    return None if found is None else found.username


# -- secret shapes -------------------------------------------------------------------


def test_dockerconfigjson_auth_field():
    secrets = dockerconfigjson({"reg.example.com": {"auth": b64(f"alice:{PASSWORD}")}})
    assert creds_for(secrets, "reg.example.com/team/model:v1") == Credentials("alice", PASSWORD)


def test_dockerconfigjson_username_password():
    secrets = dockerconfigjson({"reg.example.com": {"username": "bob", "password": PASSWORD}})
    assert creds_for(secrets, "reg.example.com/m") == Credentials("bob", PASSWORD)


def test_auth_field_wins_over_username_password():
    entry = {"auth": b64("fromauth:pw1"), "username": "plain", "password": "pw2"}
    assert creds_for(dockerconfigjson({"r.io": entry}), "r.io/m") == Credentials("fromauth", "pw1")


def test_identity_token():
    entry = {"auth": b64("user:"), "identitytoken": "refresh-token"}
    assert creds_for(dockerconfigjson({"r.io": entry}), "r.io/m") == Credentials(
        "<token>", "refresh-token"
    )
    entry = {"identitytoken": "tok"}
    assert creds_for(dockerconfigjson({"r.io": entry}), "r.io/m") == Credentials("<token>", "tok")


def test_dockercfg_legacy():
    secrets = {".dockercfg": json.dumps({"https://reg.example.com": {"auth": b64("carol:pw")}})}
    assert creds_for(secrets, "reg.example.com/m") == Credentials("carol", "pw")


def test_both_configs_merged():
    secrets = {
        ".dockerconfigjson": json.dumps({"auths": {"a.io": {"auth": b64("a:1")}}}),
        ".dockercfg": json.dumps({"b.io": {"auth": b64("b:2")}}),
    }
    assert creds_for(secrets, "a.io/m") == Credentials("a", "1")
    assert creds_for(secrets, "b.io/m") == Credentials("b", "2")


def test_username_password_keys():
    secrets = {"username": "dave", "password": PASSWORD}
    assert creds_for(secrets, "anything.example.com/m") == Credentials("dave", PASSWORD)
    assert creds_for(secrets, "busybox") == Credentials("dave", PASSWORD)
    assert creds_for({"password": "only"}, "busybox") == Credentials("", "only")


def test_docker_config_match_beats_username_password():
    secrets = {**dockerconfigjson({"r.io": {"auth": b64("cfg:pw")}}), "username": "u"}
    secrets["password"] = "p"
    assert creds_for(secrets, "r.io/m") == Credentials("cfg", "pw")
    assert creds_for(secrets, "other.io/m") == Credentials("u", "p")


def test_no_credentials():
    assert creds_for({}, "busybox") is None
    assert creds_for(dockerconfigjson({"other.io": {"auth": b64("x:y")}}), "r.io/m") is None
    assert creds_for(dockerconfigjson({}), "r.io/m") is None
    assert creds_for({".dockerconfigjson": json.dumps({})}, "r.io/m") is None
    assert creds_for({"username": "", "password": ""}, "r.io/m") is None
    assert creds_for({"unrelated": "value"}, "r.io/m") is None


# -- matching ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "reg.example.com",
        "https://reg.example.com",
        "http://reg.example.com",
        "https://reg.example.com/",
        "reg.example.com/",
        "REG.Example.COM",
    ],
)
def test_scheme_and_trailing_slash_stripped(key):
    assert user_for({key: "u"}, "reg.example.com/team/model") == "u"


def test_port_must_match():
    assert user_for({"reg.example.com:5000": "u"}, "reg.example.com:5000/m") == "u"
    assert user_for({"reg.example.com:5000": "u"}, "reg.example.com/m") is None
    assert user_for({"reg.example.com:5000": "u"}, "reg.example.com:5001/m") is None
    assert user_for({"reg.example.com": "u"}, "reg.example.com:5000/m") is None
    assert user_for({"localhost:5000": "u"}, "localhost:5000/m") == "u"


def test_path_prefix():
    auths = {"reg.example.com/team": "team"}
    assert user_for(auths, "reg.example.com/team/model") == "team"
    assert user_for(auths, "reg.example.com/team") == "team"
    assert user_for(auths, "reg.example.com/team/sub/model:v1") == "team"
    assert user_for(auths, "reg.example.com/teamx/m") is None
    assert user_for(auths, "reg.example.com/other/team") is None
    assert user_for(auths, "other.example.com/team/model") is None
    assert user_for({"https://reg.example.com/team/": "t"}, "reg.example.com/team/m") == "t"


def test_wildcard_one_label():
    auths = {"*.example.com": "wild"}
    assert user_for(auths, "a.example.com/m") == "wild"
    assert user_for(auths, "a.b.example.com/m") is None
    assert user_for(auths, "example.com/m") is None
    assert user_for(auths, "a.example.com:5000/m") is None
    assert user_for(auths, "a.example.org/m") is None
    assert user_for({"*.example.com:5000": "wp"}, "a.example.com:5000/m") == "wp"
    assert user_for({"*.example.com:5000": "wp"}, "a.example.com/m") is None


def test_longest_match_wins():
    auths = {
        "reg.example.com": "host",
        "reg.example.com/team": "team",
        "reg.example.com/team/model": "model",
        "*.example.com": "wild",
    }
    assert user_for(auths, "reg.example.com/team/model") == "model"
    assert user_for(auths, "reg.example.com/team/other") == "team"
    assert user_for(auths, "reg.example.com/elsewhere") == "host"
    assert user_for(auths, "zzz.example.com/x") == "wild"
    # An exact host beats a wildcard whatever the key lengths.
    assert (
        user_for(
            {"*.example.com/a/b/c/d/e/f": "wild", "r.example.com": "exact"},
            ("r.example.com/a/b/c/d/e/f/g"),
        )
        == "exact"
    )
    # Order in the document does not matter.
    reordered = dict(reversed(list(auths.items())))
    assert user_for(reordered, "reg.example.com/team/model") == "model"


@pytest.mark.parametrize(
    "key",
    [
        "https://index.docker.io/v1/",
        "index.docker.io",
        "docker.io",
        "https://registry-1.docker.io/v2/",
        "registry-1.docker.io",
    ],
)
def test_docker_hub_keys(key):
    assert user_for({key: "hub"}, "busybox") == "hub"
    assert user_for({key: "hub"}, "docker.io/someone/image:tag") == "hub"
    assert user_for({key: "hub"}, "ghcr.io/someone/image") is None


def test_docker_hub_path_prefix():
    auths = {"docker.io/someone": "someone", "https://index.docker.io/v1/": "hub"}
    assert user_for(auths, "someone/image") == "someone"
    assert user_for(auths, "busybox") == "hub"


# -- malformed -----------------------------------------------------------------------


@pytest.mark.parametrize("key", [".dockerconfigjson", ".dockercfg"])
@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('"string"', "not a JSON object"),
    ],
)
def test_malformed_json(key, value, match):
    with pytest.raises(InvalidArgument, match=match) as exc:
        creds_for({key: value}, "busybox")
    assert repr(key) in str(exc.value)


@pytest.mark.parametrize(
    ("auth", "match"),
    [
        ("!!!not-base64!!!", "malformed 'auth'"),
        ("YWxpY2U6cHc", "malformed 'auth'"),  # missing padding
        (base64.b64encode(b"\xff\xfe:\x80").decode(), "malformed 'auth'"),
        (b64("no-colon-here"), "not user:password"),
    ],
)
def test_bad_auth_field(auth, match):
    secrets = dockerconfigjson({"r.io": {"auth": auth}})
    with pytest.raises(InvalidArgument, match=match) as exc:
        creds_for(secrets, "r.io/m")
    assert "'r.io'" in str(exc.value)


def test_bad_auth_in_an_entry_that_does_not_match_is_ignored():
    secrets = dockerconfigjson({"other.io": {"auth": "!!!"}, "r.io": {"auth": b64("u:p")}})
    assert creds_for(secrets, "r.io/m") == Credentials("u", "p")


def test_entry_not_an_object():
    with pytest.raises(InvalidArgument, match="not an object"):
        creds_for(dockerconfigjson({"r.io": "user:pw"}), "r.io/m")


def test_password_never_in_repr_or_errors():
    cred = Credentials("alice", PASSWORD)
    assert PASSWORD not in repr(cred)
    assert PASSWORD not in str(cred)
    assert "alice" in repr(cred)
    assert "<redacted>" in repr(cred)
    assert PASSWORD not in repr([cred, {"c": cred}])
    assert PASSWORD not in f"{cred!r} {cred}"
    # A malformed secret's error names the key, never the value.
    secret_auth = "c2VjcmV0LXZhbHVlLXdpdGhvdXQtY29sb24="  # "secret-value-without-colon"
    with pytest.raises(InvalidArgument) as exc:
        creds_for(dockerconfigjson({"r.io": {"auth": secret_auth}}), "r.io/m")
    assert secret_auth not in str(exc.value)
    assert "secret-value" not in str(exc.value)
    with pytest.raises(InvalidArgument) as exc:
        creds_for({".dockerconfigjson": '{"auths": {"r.io": {"password": "hunter2"'}, "r.io/m")
    assert "hunter2" not in str(exc.value)
