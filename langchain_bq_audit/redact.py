"""Keeping secrets and personal data out of rows: capture modes, redactors, pseudonymous users.

Runs on the writer thread, on the built row, before the row can reach the spool or
BigQuery. In every mode credentials in known formats are replaced by `[SECRET]`:

- `full`: text is kept as it came, but for those credentials;
- `redacted`: e-mail addresses, phone numbers, card numbers (Luhn-checked) are replaced
  too, then the user's redactors run;
- `metadata`: no prompt or completion text at all: `input_text`/`output_text` are empty,
  their SHA-256 and length are kept, messages are dropped, tool calls keep name and id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from .schema import JSON_COLUMNS

Redactor = Callable[[str], str]

#: Columns whose text can carry what a user typed or a model said.
TEXT_COLUMNS = (
    "input_text", "output_text", "error_message", "input_messages", "output_messages",
    "tool_calls", "metadata", "invocation_params",
)  # fmt: skip

# Where a credential may start: not inside a word, but also right after a JSON escape such
# as `\n`, since messages and dict inputs are scanned as JSON text ("a\nsk-..." is
# `a\\nsk-...` there, and `\b` sees no word boundary between the `n` and the `s`).
_START = r"(?:(?<!\w)|(?<=\\[nrtbf]))"
_SECRETS = re.compile(
    "|".join(
        (
            # a private key block, to its end (or the end of the text, when cut)
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE"
            r" KEY-----|$)",
            _START + r"sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{20,}",  # OpenAI, Anthropic
            _START + r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
            _START + r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})",  # GitHub
            _START + r"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack
            _START + r"AIza[0-9A-Za-z_\-]{35}",  # Google API key
            _START + r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
            _START + r"(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key id
            _START + r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWT
        )
    )
)
_AUTH_HEADER = re.compile(
    _START + r"(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=\-]{16,}", re.IGNORECASE
)
_AWS_SECRET = re.compile(
    r"(?i)(secret_access_key|aws_secret)([\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9/+=]{40}"
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
# position), so the patterns run only on text holding one of these. Most literals hold a
# `-` or `_`: a one-character scan (memchr) for those skips their group when absent.
_MARKERS = ("AIza", "AKIA", "ASIA", "eyJ")
_MARKERS_DASH = ("-----BEGIN", "sk-", "xox")  # Slack's `xox?-`
_MARKERS_UNDERSCORE = (
    "sk_", "rk_", "pk_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "hf_",
)  # fmt: skip
_MARKERS_ANY_CASE = ("bearer", "basic", "token")
_MARKERS_ANY_CASE_UNDERSCORE = ("secret_access_key", "aws_secret")


def _may_hold_secret(text: str) -> bool:
    # plain loops: `any()` over a generator costs twice as much on short text
    for marker in _MARKERS:
        if marker in text:
            return True
    if "-" in text:
        for marker in _MARKERS_DASH:
            if marker in text:
                return True
    underscore = "_" in text
    if underscore:
        for marker in _MARKERS_UNDERSCORE:
            if marker in text:
                return True
    lowered = text.lower()
    for marker in _MARKERS_ANY_CASE_UNDERSCORE if underscore else ():
        if marker in lowered:
            return True
    return any(marker in lowered for marker in _MARKERS_ANY_CASE)


def remove_secrets(text: str) -> str:
    """Replace credentials in known formats (API keys, tokens, private keys) by `[SECRET]`."""
    if not _may_hold_secret(text):
        return text
    text = _SECRETS.sub("[SECRET]", text)
    text = _AUTH_HEADER.sub(r"\1\2[SECRET]", text)
    return _AWS_SECRET.sub(r"\1\2[SECRET]", text)


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
    text = _EMAIL.sub("[EMAIL]", text)
    text = _CARD.sub(_card, text)
    return _PHONE.sub(_phone, text)


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
        text = row.get(text_key) or ""
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
    if mode != "full" and row.get("tags"):
        row["tags"] = [_apply(t, steps) for t in row["tags"]]
    if user_key and row.get("user_id"):
        row["user_id"] = pseudonym(row["user_id"], user_key)
