"""Keeping secrets and personal data out of rows: capture modes, redactors, pseudonymous users.

Runs on the writer thread, on the built row, before the row can reach the spool or
BigQuery. In every mode credentials in known formats are replaced by `[SECRET]` (and, as
structures become JSON, values under secret-looking keys by `<removed>`, see
`is_secret_key`):

- `full`: text is kept as it came, but for those credentials;
- `redacted`: e-mail addresses, phone numbers, card numbers (Luhn-checked) are replaced
  too, then the user's redactors run;
- `metadata`: no prompt or completion text at all: `input_text`/`output_text` are empty,
  their SHA-256 and length are kept, messages are dropped, tool calls keep name and id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .schema import JSON_COLUMNS

Redactor = Callable[[str], str]

#: Columns whose text can carry what a user typed or a model said.
TEXT_COLUMNS = (
    "input_text", "output_text", "error_message", "input_messages", "output_messages",
    "tool_calls", "metadata", "invocation_params",
)  # fmt: skip

#: What replaces a credential found in text, and the value under a secret-looking key.
SECRET = "[SECRET]"
REMOVED = "<removed>"

# -- secret-looking keys ------------------------------------------------------------------------
# One check for every key: dict keys of whatever becomes JSON (rows.to_jsonable: inputs,
# outputs, metadata, invocation params, tool-call args, document metadata) and the names of
# `name=value` / `name: value` assignments inside text. A key is normalised (camelCase split,
# lower case, any run of other characters one `_`) and judged by its last word or two, so
# `accessToken`, `X-Api-Key`, `Ocp-Apim-Subscription-Key` and `DB_PASSWORD` are secret, and
# `max_tokens`, `token_usage` or `primary_key_id` are not. The words follow detect-secrets'
# KeywordDetector denylist and gitleaks' generic-api-key keywords.
_KEY_LAST_WORDS = frozenset({
    "password", "passwd", "pwd", "pass", "passphrase", "secret", "token", "apikey", "auth",
    "authorization", "cookie", "credential", "credentials", "secretkey", "privatekey",
    "accesstoken", "refreshtoken", "authtoken", "clientsecret", "sessionkey",
})  # fmt: skip
_KEY_LAST_PAIRS = frozenset({
    "api_key", "private_key", "secret_key", "access_key", "account_key", "subscription_key",
    "signing_key", "encryption_key", "master_key", "auth_key", "session_key", "client_key",
    "service_key", "ssh_key", "pass_word", "connection_string", "conn_str", "key_pass",
})  # fmt: skip
#: Literals (lower case) every secret-looking key holds: a text without one of them holds
#: no secret key, so neither the key walk nor the assignment pattern needs to run.
KEY_MARKERS = ("pass", "pwd", "secret", "token", "key", "auth", "cookie", "credential", "conn")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_secret_keys: dict[str, bool] = {}  # the same few keys come in every run's metadata


def _judge_key(key: str) -> bool:
    words = [w for w in _NOT_ALNUM.split(_CAMEL.sub("_", key).lower()) if w]
    return bool(words) and (words[-1] in _KEY_LAST_WORDS or "_".join(words[-2:]) in _KEY_LAST_PAIRS)


def is_secret_key(key: str) -> bool:
    """True for keys that usually hold credentials, in any spelling: `api_key`, `apiKey`,
    `X-Api-Key`, `clientSecret`, `Authorization`, `Cookie`; False for `max_tokens`."""
    known = _secret_keys.get(key)
    if known is None:
        known = _judge_key(key)
        if len(_secret_keys) < 10_000:  # bounded: keys can be data, e.g. ids
            _secret_keys[key] = known
    return known


def may_hold_secret_key(text: str) -> bool:
    """False only when `text` (e.g. JSON) cannot hold a key `is_secret_key` accepts."""
    lowered = text.lower()
    # a plain loop: `any()` over a generator costs twice as much on short text
    for marker in KEY_MARKERS:  # noqa: SIM110
        if marker in lowered:
            return True
    return False


# -- credentials in text ------------------------------------------------------------------------
# Where a credential may start: not inside a word, but also right after a JSON escape such
# as `\n`, since messages and dict inputs are scanned as JSON text ("a\nsk-..." is
# `a\\nsk-...` there, and `\b` sees no word boundary between the `n` and the `s`).
# Formats adapted from gitleaks' rules (MIT) and Nosey Parker's (Apache-2.0).
_START = r"(?:(?<!\w)|(?<=\\[nrtbf]))"
# a private key block, to its end (or the end of the text, when cut)
_KEY_HEADER = r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"
_KEY_FOOTER = r"-----END [A-Z0-9 ]*PRIVATE KEY-----"
_TOKENS = "|".join(
    (
        _START + r"sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{20,}",  # OpenAI, Anthropic
        _START + r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
        _START + r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})",  # GitHub
        _START + r"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack
        r"(?:https?://)?hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/_\-]{20,}",
        _START + r"AIza[0-9A-Za-z_\-]{35}",  # Google API key
        _START + r"ya29\.[0-9A-Za-z_\-]{20,}",  # Google OAuth access token
        _START + r"GOCSPX-[0-9A-Za-z_\-]{20,}",  # Google OAuth client secret
        _START + r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
        _START + r"(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key id
        _START + r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWT
    )
)
_SECRETS = re.compile(f"{_KEY_HEADER}[\\s\\S]*?(?:{_KEY_FOOTER}|$)|{_TOKENS}")
_KEY_HEADER_AT = re.compile(_KEY_HEADER)
_KEY_FOOTER_AT = re.compile(_KEY_FOOTER)
_TOKENS_AT = re.compile(_TOKENS)
# `Bearer x`, `Basic x`, `token x` (HTTP Authorization schemes), a credential of any length;
# matched where `_replace_at` finds the scheme.
_AUTH_HEADER = re.compile(_START + r"(bearer|basic|token)(\s+)([A-Za-z0-9._~+/=\-]+)", re.I)
# `user:password@` after a URL's `://` (as detect-secrets' BasicAuthDetector): the password.
_URL_CREDENTIALS = re.compile(r"://[^\s/?#@:\"'\\]*:([^\s/?#@\"'\\]+)@")
# `name=value`, `name: value`, `"name": "value"` (also JSON-escaped), `Name=value;` in a
# connection string; the value goes when `is_secret_key(name)`. A pattern tried at every
# position costs 40x as much as the literal scans on long text, so the scan starts from
# each key marker (few): forward over its word (and maybe one more) to a separator, then
# back from that separator to the whole name, matched on the reversed text.
_TO_SEPARATOR = re.compile(r"[\w.\-]*(?:[ ][A-Za-z][\w.\-]*)?\\?[\"']?[ \t]*[:=]")
_NAME_REVERSED = re.compile(r"[ \t]*[\"']?\\?([\w.\-]*[A-Za-z](?:[ ][\w.\-]*[A-Za-z])?)(?![\w.\-])")
# After the separator: an HTTP scheme, kept (`Authorization: Bearer x`), then the value; a
# quoted value may hold blanks.
_VALUE = re.compile(
    r"[ \t]*((?i:bearer|basic|token|digest)[ \t]+)?(\\?[\"'])?"
    r"((?(2)[^\"'\\\n]+|[^\s\"'\\,;&<>()\[\]{}]+))"
)


# An address starts after a JSON escape or a character an address cannot hold.
_EMAIL = re.compile(
    r"(?:(?<=\\[nrtbf])|(?<![A-Za-z0-9._%+\-\\]))"
    r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)
_CARD = re.compile(r"(?<![\d\-])\d(?:[ \-]?\d){12,18}(?![\d\-])")
_PHONE = re.compile(
    r"(?:(?<=\\[nrtbf])|(?<![\w+]))"
    r"(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{2,4}(?:[ .\-]\d{2,4}){1,4}(?!\w)"
)


# Literals every credential pattern above contains. Substring scans are ~10x faster than
# the patterns on long text (Python's regex engine tries each alternative at every
# position), so a pattern runs only on text holding one of its literals. Most literals hold
# a `-`, `_` or `.`: a one-character scan (memchr) for those skips their group when absent.
_MARKERS = ("AIza", "AKIA", "ASIA", "eyJ")
_MARKERS_DASH = ("-----BEGIN", "sk-", "xox", "GOCSPX-")  # Slack's `xox?-`
_MARKERS_UNDERSCORE = (
    "sk_", "rk_", "pk_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "hf_",
)  # fmt: skip
_MARKERS_DOT = ("ya29.", "hooks.slack.com")
_MARKERS_ANY_CASE = ("bearer", "basic", "token")


def _has_pattern_marker(text: str) -> bool:
    # plain loops: `any()` over a generator costs twice as much on short text
    for marker in _MARKERS:
        if marker in text:
            return True
    if "-" in text:
        for marker in _MARKERS_DASH:
            if marker in text:
                return True
    if "_" in text:
        for marker in _MARKERS_UNDERSCORE:
            if marker in text:
                return True
    if "." in text:
        for marker in _MARKERS_DOT:
            if marker in text:
                return True
    return False


def _may_hold_secret(text: str) -> bool:
    """False only when no pattern of `remove_secrets` can match `text`."""
    if _has_pattern_marker(text) or ("://" in text and "@" in text):
        return True
    lowered = text.lower()
    for marker in _MARKERS_ANY_CASE:
        if marker in lowered:
            return True
    if ":" in text or "=" in text:
        for marker in KEY_MARKERS:
            if marker in lowered:
                return True
    return False


def _base64_pair(text: str) -> bool:
    """True when `text` is base64 of `user:password` (an HTTP Basic credential)."""
    if len(text) % 4:
        return False
    try:
        return b":" in base64.b64decode(text, validate=True)
    except ValueError:
        return False


def _auth_header(match: re.Match[str]) -> str:
    scheme, space, credential = match.groups()
    kind = scheme.lower()
    if len(credential) < 16:  # short: keep words of prose ("bearer bonds", "basic idea")
        if kind == "token" or (kind == "basic" and not _base64_pair(credential)):
            return match.group()
        if kind == "bearer" and credential.isalpha() and credential.islower():
            return match.group()
    return f"{scheme}{space}{SECRET}"


_SCHEMES = frozenset({"bearer", "basic", "token", "digest"})


def _assigned_name(text: str, reversed_text: str, at: int) -> str | None:
    """The name assigned to by the separator at `at`, when it may be a secret's."""
    match = _NAME_REVERSED.match(reversed_text, len(text) - at)
    if match is None:
        return None
    name = match.group(1)[::-1]
    end = match.end()
    if end < len(text) and reversed_text[end] == "\\" and name[0] in "nrtbf":
        name = name[1:]  # `\npassword=` in JSON text: the name is `password`
    return name if is_secret_key(name) else None


def _separators(text: str, lowered: str) -> list[int]:
    """Positions of the `:` or `=` after each word holding a key marker, in order."""
    found: set[int] = set()
    for marker in KEY_MARKERS:
        at = lowered.find(marker)
        while at >= 0:
            match = _TO_SEPARATOR.match(text, at)
            if match is not None:
                found.add(match.end() - 1)
            at = lowered.find(marker, at + len(marker))
    return sorted(found)


def _remove_assigned(text: str, lowered: str) -> str:
    """`text` with the values of assignments to secret-looking names replaced."""
    separators = _separators(text, lowered)
    if not separators:
        return text
    reversed_text = text[::-1]
    out: list[str] = []
    done = 0
    for at in separators:
        if at < done or _assigned_name(text, reversed_text, at) is None:
            continue
        value = _VALUE.match(text, at + 1)
        if (
            value is None
            or value.group(3) in (REMOVED, SECRET)
            or (
                value.group(3).lower() in _SCHEMES  # `Authorization: Bearer [SECRET]`
            )
        ):
            continue
        out += (text[done : value.start(3)], SECRET)
        done = value.end()
    return "".join(out) + text[done:] if out else text


def _password(match: re.Match[str]) -> str:
    return match.group()[: match.start(1) - match.start()] + SECRET + "@"


def _replace_at(
    text: str,
    haystack: str,
    literal: str,
    pattern: re.Pattern[str],
    replace: Callable[[re.Match[str]], str],
) -> str:
    """`pattern.sub(replace, text)` for matches starting where `literal` is in `haystack`
    (`text` or its lower case): a pattern tried only there, not at every position."""
    out: list[str] = []
    done = 0
    at = haystack.find(literal)
    while at >= 0:
        match = pattern.match(text, at) if at >= done else None
        if match is not None:
            out += (text[done:at], replace(match))
            done = match.end()
        at = haystack.find(literal, at + 1)
    return "".join(out) + text[done:] if out else text


def remove_secrets(text: str) -> str:
    """Replace credentials by `[SECRET]`: API keys and tokens in known formats, private key
    blocks, bearer and basic credentials, passwords in URLs, and the values of assignments
    to secret-looking names (`password=...`, `"api_key": "..."`, `AccountKey=...;`)."""
    if not _may_hold_secret(text):
        return text
    if _has_pattern_marker(text):
        text = _sub_secrets(text)
    lowered = text.lower()
    for scheme in _MARKERS_ANY_CASE:
        if scheme in lowered:
            text = _replace_at(text, lowered, scheme, _AUTH_HEADER, _auth_header)
            lowered = text.lower()
    if "://" in text and "@" in text:
        text = _replace_at(text, text, "://", _URL_CREDENTIALS, _password)
    if ":" in text or "=" in text:
        return _remove_assigned(text, text.lower())
    return text


# -- bounded scans ------------------------------------------------------------------------------
# A regex call holds the interpreter lock from start to end: `_SECRETS.sub` over 4 MB of text
# runs for seconds, and the application's threads wait all that time. Long text is scanned in
# calls over about `SCAN_CHUNK` characters each (a few ms at most), with the same result as
# one call: a chunk ends just after a *barrier*, a character that no match of the pattern
# can hold (every class it consumes excludes it; it has no `$`, no empty match, and its
# lookaheads test one character), so no match spans two chunks and every attempt inside a
# chunk sees exactly what it would see in the whole text (lookbehinds see before `pos`). A
# stretch with no barrier at all (a megabyte of one word) is still scanned in one call.

#: Characters a bounded scan covers in one regex call, before it looks for a barrier.
SCAN_CHUNK = 4096


def iter_bounded(
    pattern: re.Pattern[str], barrier: re.Pattern[str], text: str, pos: int = 0
) -> Iterator[re.Match[str]]:
    """`pattern.finditer(text, pos)`, match for match, in regex calls over about
    `SCAN_CHUNK` characters each. `barrier` matches one character no match of `pattern`
    can hold (see above); the result is the same for any chunk size."""
    size = len(text)
    while pos < size:
        end = size
        at = pos + SCAN_CHUNK
        while at < size:
            cut = barrier.search(text, at, at + SCAN_CHUNK)
            if cut is not None:
                end = cut.end()  # the barrier inside the chunk: a lookahead sees it
                break
            at += SCAN_CHUNK
        yield from pattern.finditer(text, pos, end)
        pos = end


def bounded_sub(
    pattern: re.Pattern[str],
    barrier: re.Pattern[str],
    replace: str | Callable[[re.Match[str]], str],
    text: str,
) -> str:
    """`pattern.sub(replace, text)` in bounded calls (`iter_bounded`); a `replace` string is
    taken literally (no group references), whatever the text's length."""
    if len(text) <= SCAN_CHUNK:
        return pattern.sub(replace if callable(replace) else lambda _: replace, text)
    out: list[str] = []
    done = 0
    for match in iter_bounded(pattern, barrier, text):
        out += (text[done : match.start()], replace if isinstance(replace, str) else replace(match))
        done = match.end()
    return "".join(out) + text[done:] if out else text


# Barriers: a character outside every class the pattern consumes.
_TOKENS_BARRIER = re.compile(r"[^A-Za-z0-9_\-+/.:]")
_KEY_FOOTER_BARRIER = re.compile(r"[^A-Z0-9 \-]")
_EMAIL_BARRIER = re.compile(r"[^A-Za-z0-9._%+\-@]")
_CARD_BARRIER = re.compile(r"[^\d \-]")
_PHONE_BARRIER = re.compile(r"[^\d+() .\-]")


def _key_block(text: str, pos: int, footers: list[int]) -> tuple[int, int] | None:
    """Where `_SECRETS`' private-key alternative matches first at or after `pos`: the
    header, then up to the first footer, or to `$` (the end, before a final newline).

    `footers` (empty at first, kept by the caller across calls on one text) remembers the
    last footer search, `[from, start, end]` (`start` -1: none after `from`), so headers
    that tokens overrun one after another do not each scan to the end: linear, not
    quadratic, in the text's length."""
    at = text.find("-----BEGIN", pos)
    while at >= 0:
        header = _KEY_HEADER_AT.match(text, at)
        if header is not None:
            begin = header.end()
            if footers and footers[0] <= begin and (footers[1] < 0 or begin <= footers[1]):
                start, end = footers[1], footers[2]  # the first footer after `begin` too
            else:
                found = next(iter_bounded(_KEY_FOOTER_AT, _KEY_FOOTER_BARRIER, text, begin), None)
                start, end = (found.start(), found.end()) if found else (-1, -1)
                footers[:] = [begin, start, end]
            if start >= 0:
                return at, end
            return at, len(text) - 1 if text.endswith("\n") else len(text)
        at = text.find("-----BEGIN", at + 1)
    return None


def _sub_secrets(text: str) -> str:
    """`_SECRETS.sub(SECRET, text)` in bounded calls. The private-key alternative, which
    can hold any character, is found apart (`_key_block`); it comes first in `_SECRETS`, so
    it wins where a token would start at the same place, and a token already under way
    when a block starts keeps going, as in one call."""
    if len(text) <= SCAN_CHUNK:
        return _SECRETS.sub(SECRET, text)
    out: list[str] = []
    done = pos = 0
    footers: list[int] = []
    while True:
        block = _key_block(text, pos, footers)
        stop = len(text) if block is None else block[0]
        overran = False
        for match in iter_bounded(_TOKENS_AT, _TOKENS_BARRIER, text, pos):
            if match.start() >= stop:
                break
            out += (text[done : match.start()], SECRET)
            done = match.end()
            overran = done > stop  # the block's header is inside this token: no block
            if overran:
                break
        if overran:
            pos = done
            continue
        if block is None:
            return "".join(out) + text[done:] if out else text
        out += (text[done : block[0]], SECRET)
        done = pos = block[1]


def luhn_ok(digits: str) -> bool:
    """True when `digits` passes the Luhn check that card numbers carry."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else match.group()


def _phone(match: re.Match[str]) -> str:
    digits = sum(c.isdigit() for c in match.group())
    return "[PHONE]" if 9 <= digits <= 15 else match.group()


def redact_personal(text: str) -> str:
    """Replace e-mail addresses, card numbers (Luhn-checked) and phone numbers."""
    text = bounded_sub(_EMAIL, _EMAIL_BARRIER, "[EMAIL]", text)
    text = bounded_sub(_CARD, _CARD_BARRIER, _card, text)
    return bounded_sub(_PHONE, _PHONE_BARRIER, _phone, text)


def pseudonym(user_id: str, key: str) -> str:
    """HMAC-SHA256 of `user_id` under `key`, hex: stable across processes, not reversible
    without the key."""
    return hmac.new(key.encode("utf-8"), user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _apply(value: str, redactors: Sequence[Redactor]) -> str:
    for redactor in redactors:
        try:
            value = redactor(value)
        except Exception as exc:  # unsure what is left: keep nothing of the text
            return f"[redaction failed: {type(exc).__name__}]"
        if not isinstance(value, str):
            return f"[redaction failed: {type(value).__name__} returned]"
    return value


def _metadata_only(row: dict[str, Any]) -> None:
    for text_key, hash_key, size_key in (
        ("input_text", "input_sha256", "input_chars"),
        ("output_text", "output_sha256", "output_chars"),
    ):
        # credentials out first: a hash of a short secret could be looked up
        text = remove_secrets(row.get(text_key) or "")
        row[hash_key] = sha256(text)
        row[size_key] = len(text)
        row[text_key] = ""
    row.pop("input_messages", None)
    row.pop("output_messages", None)
    if row.get("tool_calls"):
        try:
            calls = json.loads(row["tool_calls"])
            row["tool_calls"] = json.dumps([{"name": c.get("name"), "id": c.get("id")}
                                            for c in calls])  # fmt: skip
        except (ValueError, TypeError, AttributeError):
            row.pop("tool_calls")


def capture(row: dict[str, Any], mode: str) -> None:
    """Apply the capture mode to a built row, in place (before it is cut to size, so the
    hashes of `metadata` mode are of the whole text)."""
    row["capture_mode"] = mode
    if mode == "metadata":
        _metadata_only(row)


def _with_markers(texts: dict[str, str]) -> dict[str, str]:
    """The texts that may hold a credential. Short ones are scanned as one (a scan's
    overhead is their cost); long ones alone (a `_` in one skips no group in the rest)."""
    out = {key: text for key, text in texts.items() if len(text) > 2000}
    short = [text for text in texts.values() if len(text) <= 2000]
    if short and _may_hold_secret("\n".join(short)):
        return texts
    return {key: text for key, text in out.items() if _may_hold_secret(text)}


def redact_row(
    row: dict[str, Any], mode: str, redactors: Sequence[Redactor], user_key: str | None
) -> None:
    """Run the redactors over the row's text columns and pseudonymize `user_id`, in place."""
    texts = {}
    for key in TEXT_COLUMNS:
        value = row.get(key)
        if value and isinstance(value, str):
            texts[key] = value
    steps: list[Redactor] = [remove_secrets]
    if mode != "full":
        steps += [redact_personal, *redactors]
    else:  # full: only credentials, and only in text that holds a marker
        texts = _with_markers(texts)
    for key, value in texts.items():
        new = _apply(value, steps)
        if new != value and key in JSON_COLUMNS:
            try:
                json.loads(new)
            except ValueError:  # a redactor broke the JSON: keep it, as a JSON string
                new = json.dumps(new)
        row[key] = new
    if row.get("tags"):
        row["tags"] = [_apply(t, steps) if mode != "full" or _may_hold_secret(t) else t
                       for t in row["tags"]]  # fmt: skip
    if user_key and row.get("user_id"):
        row["user_id"] = pseudonym(row["user_id"], user_key)
