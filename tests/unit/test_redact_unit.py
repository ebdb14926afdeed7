"""The key check and the credential formats of `redact`, without BigQuery."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator

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


# -- bounded scans: long text in short regex calls, with the result of one call --------------

# Pieces that make matches, near-matches and every barrier kind, so that a cut between chunks
# falls inside, beside and between them.
PIECES = (
    "sk-", "sk-proj-", "A" * 25, "AKIA", "ABCDEFGHIJKLMNOP", "ghp_", "b" * 40, "eyJ",
    "abcdefgh", "hooks.slack.com/services/", "https://", "ya29.", "_", ".", ":", "/", "-",
    "-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----", "\n", " ", "\\n",
    "a@b.co", "x.y@ex-ample.com", "4111 1111 1111 1111", "+1 (415) 555-0123", "12", "9", "é",
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(text=st.lists(st.sampled_from(PIECES), max_size=40).map("".join),
       chunk=st.integers(min_value=1, max_value=16))  # fmt: skip
def test_bounded_scans_give_what_one_call_gives(text: str, chunk: int) -> None:
    """The oracle is the regex run once over the whole text (what the module did before)."""
    from langchain_bq_audit import redact

    whole = {
        "secrets": redact._SECRETS.sub(redact.SECRET, text),
        "email": redact._EMAIL.sub("[EMAIL]", text),
        "card": redact._CARD.sub(redact._card, text),
        "phone": redact._PHONE.sub(redact._phone, text),
    }
    saved = redact.SCAN_CHUNK
    redact.SCAN_CHUNK = chunk
    try:
        assert redact._sub_secrets(text) == whole["secrets"]
        email = redact.bounded_sub(redact._EMAIL, redact._EMAIL_BARRIER, "[EMAIL]", text)
        assert email == whole["email"]
        card = redact.bounded_sub(redact._CARD, redact._CARD_BARRIER, redact._card, text)
        assert card == whole["card"]
        phone = redact.bounded_sub(redact._PHONE, redact._PHONE_BARRIER, redact._phone, text)
        assert phone == whole["phone"]
    finally:
        redact.SCAN_CHUNK = saved


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # each match crosses the first chunk's end (SCAN_CHUNK is 8 here)
        ("write to bob.smith@example.com today", "write to [EMAIL] today"),
        ("key sk-proj-abcdefghijklmnopqrstuvwxyz0123 ok", "key [SECRET] ok"),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
        ("call +1 (415) 555-0123 now", "call [PHONE] now"),
        ("id AKIAABCDEFGHIJKLMNOP.", "id [SECRET]."),
        # a key block with no footer runs to the end (before a final newline), as in one call
        ("a -----BEGIN PRIVATE KEY-----\nMIIE abc\nmore\n", "a [SECRET]\n"),
        ("a -----BEGIN PRIVATE KEY-----\nM\n-----END PRIVATE KEY----- b", "a [SECRET] b"),
        # a token under way when a key header starts swallows the header, as in one call
        ("sk-" + "a" * 25 + "-----BEGIN RSA PRIVATE KEY----- x", "[SECRET] RSA PRIVATE KEY----- x"),
    ],
)
def test_a_match_across_a_chunk_boundary_is_replaced_whole(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    from langchain_bq_audit import redact

    monkeypatch.setattr(redact, "SCAN_CHUNK", 8)
    assert redact.redact_personal(redact.remove_secrets(text)) == expected


class _Recording:
    """A compiled pattern that records the span of text each regex call may read."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.spans: list[int] = []

    def finditer(self, text: str, pos: int, endpos: int) -> Iterator[re.Match[str]]:
        self.spans.append(endpos - pos)
        return self.pattern.finditer(text, pos, endpos)


def test_long_text_is_scanned_in_calls_of_bounded_size() -> None:
    """4 MB of prose: no regex call reads more than two chunks (a chunk, then up to the next
    barrier), and the matches are those of one call."""
    from langchain_bq_audit import redact

    text = "write to ann@example.com or bob@example.org, " * 90_000
    recording = _Recording(redact._EMAIL)
    found = list(redact.iter_bounded(recording, redact._EMAIL_BARRIER, text))  # type: ignore[arg-type]
    assert [m.span() for m in found] == [m.span() for m in redact._EMAIL.finditer(text)]
    assert len(recording.spans) > len(text) // redact.SCAN_CHUNK // 2
    assert max(recording.spans) <= 2 * redact.SCAN_CHUNK


def test_tokens_running_into_many_key_headers_cost_one_footer_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each token overruns the next key header, and no footer follows: the search for a
    footer reads the text about once (it read to the end for every header: quadratic,
    14 s for 880 KB), and the result is one call's."""
    from langchain_bq_audit import redact

    text = ("sk-" + "a" * 20 + "-----BEGIN RSA PRIVATE KEY----- ") * 2_000
    recording = _Recording(redact._KEY_FOOTER_AT)
    monkeypatch.setattr(redact, "_KEY_FOOTER_AT", recording)
    assert redact._sub_secrets(text) == redact._SECRETS.sub(redact.SECRET, text)
    assert sum(recording.spans) <= 2 * len(text)
