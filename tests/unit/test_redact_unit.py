"""The key check and the credential formats of `redact`, without BigQuery."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_bq_audit.redact import is_secret_key, may_hold_secret_key, remove_secrets

from ..planted import FORMATS, PEM, PEM_LINES

# -- the key check --------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["api_key", "apiKey", "APIKey", "OPENAI_API_KEY", "x-api-key", "X-Api-Key", "password",
     "DB_PASSWORD", "passwd", "accessToken", "refresh_token", "id_token", "clientSecret",
     "client_secret", "privateKey", "private-key", "Ocp-Apim-Subscription-Key", "Authorization",
     "Proxy-Authorization", "Cookie", "Set-Cookie", "secret", "aws_secret_access_key",
     "AccountKey", "connectionString", "x-goog-api-key", "X-Amz-Security-Token", "credentials",
     "my api key", "auth"],
)  # fmt: skip
def test_secret_looking_keys_in_every_spelling(key: str) -> None:
    assert is_secret_key(key)
    assert may_hold_secret_key(json.dumps({key: 1}))  # the prefilter lets it through


@pytest.mark.parametrize(
    "key",
    ["max_tokens", "ls_max_tokens", "total_tokens", "token_usage", "question", "author",
     "primary_key", "keys", "model", "session_id", "passenger", "cache_key_prefix"],
)  # fmt: skip
def test_ordinary_keys_are_kept(key: str) -> None:
    assert not is_secret_key(key)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_loses_its_secret_and_keeps_its_context(name: str) -> None:
    text, secret = FORMATS[name]
    out = remove_secrets(f"before {text} after")
    assert secret not in out
    assert out.startswith("before ") and out.endswith(" after") and "[SECRET]" in out


def test_a_private_key_block_loses_every_line() -> None:
    out = remove_secrets("key:\n" + PEM + "\nthanks")
    assert not any(line in out for line in PEM_LINES)
    assert out == "key:\n[SECRET]\nthanks"


@pytest.mark.parametrize(
    "prose",
    ["bearer bonds are old", "a basic idea", "the token limit", "max_tokens: 256",
     "the key: patience", "token usage was 12", "see https://example.com/a@b"],
)  # fmt: skip
def test_prose_that_only_resembles_a_credential_is_kept(prose: str) -> None:
    assert remove_secrets(prose) == prose


# -- every credential shape, as a property --------------------------------------------------


ALNUM = "ABCXYZabcxyz0189"


def body(size: int, alphabet: str = ALNUM) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=size, max_size=size + 24)


# Each strategy draws a credential (a prefix and a body of the shape its format has, so every
# example is one) and the part of it that must go.
CREDENTIALS = [
    *(st.builds(lambda p, b: (p + b, b), st.just(p), body(36))
      for p in ("sk-", "sk-proj-", "sk_live_", "rk_test_", "pk_live_", "ghp_", "ghs_",
                "xoxb-", "hf_", "ya29.", "GOCSPX-")),
    st.builds(lambda b: ("github_pat_" + b, b), body(40)),
    st.builds(lambda b: ("AIza" + b, b), body(35, ALNUM + "_-").map(lambda t: t[:35])),
    st.builds(lambda p, b: (p + b, b), st.sampled_from(["AKIA", "ASIA"]),
              st.text(alphabet="ABCXYZ0189", min_size=16, max_size=16)),
    st.builds(lambda p, b: (p + b, b),
              st.sampled_from(["aws_secret=", "SECRET_ACCESS_KEY: ", "password=", "api_key: ",
                               "clientSecret=", '"accessToken": "', "AccountKey="]),
              body(8, ALNUM + "+/")),
    # bearer and basic credentials of any length
    st.builds(lambda p, b: (p + b, b), st.sampled_from(["Bearer ", "bearer\t", "BEARER "]),
              st.text(alphabet=ALNUM, max_size=40).map(lambda t: t + "9")),
    st.builds(lambda b: ("Basic " + b, b),
              st.text(alphabet=ALNUM, min_size=1, max_size=20).map(
                  lambda t: base64.b64encode(f"{t}:{t[::-1]}".encode()).decode())),
    st.builds(lambda p, b: (p + b, b), st.sampled_from(["token ", "TOKEN\t"]), body(16)),
    st.builds(lambda b: (f"https://user:{b}@db.example.com/x", b), body(8)),
    st.builds(lambda b: ("https://hooks.slack.com/services/T0/B0/" + b, b), body(24)),
    st.builds(lambda b: (f"eyJ{b}.eyJ{b}.{b}", b), body(8)),
    st.builds(lambda b: ("-----BEGIN RSA PRIVATE KEY-----\n" + b, b), body(36)),
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    before=st.sampled_from(["", " ", "\n", "\\n", '"', "(", "x: "]),
    credential=st.one_of(CREDENTIALS),
    after=st.sampled_from(["", " ", "\n", ";", '"']),
)
def test_every_credential_shape_is_removed_and_passes_the_prefilter(
    before: str, credential: tuple[str, str], after: str
) -> None:
    """`remove_secrets` runs its patterns only on text holding one of a few literals: every
    credential must hold one, and must leave no trace of its secret part."""
    from langchain_bq_audit import redact

    shape, secret = credential
    text = before + shape + after
    assert redact._may_hold_secret(text), text
    assert secret not in redact.remove_secrets(text), text
