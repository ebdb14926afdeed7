"""Tamper evidence: a hash chain over the rows each writer writes, and its verification.

Each writer process starts a chain (`chain_id`) and numbers its rows (`seq` from 1). A row's
`row_hash` is the SHA-256 of its canonical JSON, which includes `chain_id`, `seq` and
`prev_hash` (the previous row's `row_hash`). Deleting a row leaves a gap in `seq`; editing
one breaks its hash; rewriting the hash too breaks the next row's link. The chain shows
changes, it does not prevent them: table IAM does that.

The canonical form is computed from values that survive BigQuery's round trip: timestamps
as microseconds, JSON columns parsed (integral floats as integers), ints in STRING columns
as their digits, NULLs and empty lists (also a JSON column holding `[]` or `null`) left out,
so columns added to the table later do not change old rows' hashes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import json.scanner
import re
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .jsoncodec import ExactFloat, exact_float, sorted_json
from .schema import COLUMNS, JSON_COLUMNS

GENESIS = "0" * 64
_TIMESTAMPS = frozenset(c.name for c in COLUMNS if c.type == "TIMESTAMP")
_STRINGS = frozenset(c.name for c in COLUMNS if c.type == "STRING")
_CONVERTED = _TIMESTAMPS | JSON_COLUMNS
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_EXACT = 2**53


_FRACTION = re.compile(r"\d\d:\d\d:\d\d\.(\d+)")  # a time's fraction of a second
_seconds: dict[str, int] = {}  # "2026-01-02T03:04:05" -> epoch seconds: rows come many a second


def _micros(value: Any) -> int:
    if type(value) is str and len(value) == 32 and value[19] == "." and value[26:] == "+00:00":
        # the writer's own form (rows.iso): the seconds are parsed once, the micros sliced
        head = value[:19]
        second = _seconds.get(head)
        if second is None:
            if len(_seconds) >= 1024:
                _seconds.clear()
            second = _seconds[head] = _micros(head + "+00:00") // 1_000_000
        return second * 1_000_000 + int(value[20:26])
    if isinstance(value, str):
        if value.endswith("Z"):  # RFC 3339's UTC mark: Python before 3.11 cannot parse it
            value = value[:-1] + "+00:00"
        fraction = _FRACTION.search(value)
        if fraction is not None and len(fraction.group(1)) != 6:
            # nor a fraction of other than 3 or 6 digits (`04.5`): pad or cut to microseconds
            digits = fraction.group(1)[:6].ljust(6, "0")
            value = f"{value[: fraction.start(1)]}{digits}{value[fraction.end(1) :]}"
        value = _dt.datetime.fromisoformat(value)
        if value.tzinfo is None:  # BigQuery's TIMESTAMP is UTC
            value = value.replace(tzinfo=_dt.timezone.utc)
    delta: _dt.timedelta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _norm(value: Any) -> Any:
    if isinstance(value, float):
        if value.is_integer() and -_EXACT <= value <= _EXACT:
            return int(value)
        return exact_float(value)  # so the fast encoder cannot spell it differently
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _float(text: str) -> int | float:
    """`_norm` applied while parsing: only float literals pay for it (the writer's path)."""
    return _norm(float(text))  # type: ignore[no-any-return]


# Made once: `json.loads` with options builds a new decoder on every call. NaN and
# Infinity (which json reads, and a redactor's output could hold) as `ExactFloat`s too.
_DECODER = json.JSONDecoder(parse_float=_float, parse_constant=lambda c: ExactFloat(c))
_DECODE = _DECODER.decode
# The decoder's own scanner, called directly: `decode` adds two whitespace matches and two
# Python calls (half its cost on a short text), needed only for text that starts or ends
# with whitespace, which the writer's compact JSON never does.
_SCAN = json.scanner.make_scanner(_DECODER)  # type: ignore[arg-type]
_MAX_KEPT = 2048  # characters of a JSON text whose parsed value is kept
_parsed: dict[str, Any] = {}  # JSON text -> its value: metadata, params recur in every row


def _json_value(text: str) -> Any:
    """`_DECODE(text)`, for a JSON column's text. Values are shared between calls: the
    canonical form only reads them."""
    value = _parsed.get(text, _parsed)
    if value is not _parsed:
        return value
    if text and text[0] in "[{" and text[-1] in "]}":  # no whitespace around it
        try:
            value, end = _SCAN(text, 0)
        except (StopIteration, ValueError):  # not JSON: `decode` raises its own error
            end = -1
        if end != len(text):
            value = _DECODE(text)
    else:
        value = _DECODE(text)
    if len(text) <= _MAX_KEPT:
        if len(_parsed) >= 512:  # bounded; a process sees few metadata and params texts
            _parsed.clear()
        _parsed[text] = value
    return value


def canonical(row: Mapping[str, Any], json_parsed: bool = False) -> bytes:
    """The bytes a row's hash is taken over (everything but `row_hash` itself).

    `json_parsed`: JSON columns hold parsed values (as read back from BigQuery) rather than
    the JSON text the writer sends.
    """
    out: dict[str, Any] = {}
    for key, value in row.items():
        if type(value) is str:  # most columns: only timestamps and JSON text change
            if key in _CONVERTED:
                if key in _TIMESTAMPS:
                    value = _micros(value)
                elif not json_parsed:
                    value = _json_value(value)
                    if value is None or value == []:  # read back as NULL: both sides agree
                        continue
        elif value is None or value == []:
            continue
        elif key in _TIMESTAMPS:
            value = _micros(value)
        elif key in JSON_COLUMNS:
            value = _norm(value) if json_parsed else _DECODE(value)
            if value is None or value == []:
                continue
        elif type(value) is float:  # the only scalar _norm changes
            value = _norm(value)
        elif type(value) is int and key in _STRINGS:  # BigQuery stores it as its digits
            value = str(value)
        out[key] = value
    out.pop("row_hash", None)
    return sorted_json(out)


def row_hash(row: Mapping[str, Any], json_parsed: bool = False) -> str:
    return hashlib.sha256(canonical(row, json_parsed)).hexdigest()


class HashChain:
    """The chain of one writer in one process. Thread-safe."""

    def __init__(self) -> None:
        self.chain_id = str(uuid.uuid4())
        self._seq = 0
        self._prev = GENESIS
        self._lock = threading.Lock()

    def link(self, row: dict[str, Any]) -> None:
        """Number the row and set its `prev_hash` and `row_hash`, in place."""
        with self._lock:
            self._seq += 1
            row["chain_id"] = self.chain_id
            row["seq"] = self._seq
            row["prev_hash"] = self._prev
            row["row_hash"] = self._prev = row_hash(row)


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a chain."""

    chain_id: str
    seq: int
    kind: str  # missing, edited, broken_link, conflict
    detail: str

    def __str__(self) -> str:
        return f"chain {self.chain_id} seq {self.seq}: {self.kind}: {self.detail}"


@dataclass
class Report:
    """What `verify` found: rows per chain, and the findings."""

    rows: dict[str, int]
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings


def verify(rows: Iterable[Mapping[str, Any]], from_start: bool = True) -> Report:
    """Check the chains in `rows` (as read back from BigQuery, JSON parsed).

    Exact duplicates of a row (replays, retries) are tolerated. With `from_start` False
    (rows from a time window), seqs before a chain's first row in the window are not
    reported missing.
    """
    chains: dict[str, dict[int, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("chain_id") is not None and row.get("seq") is not None:
            chains[row["chain_id"]][int(row["seq"])].append(row)
    findings: list[Finding] = []
    counts: dict[str, int] = {}
    for chain_id, by_seq in sorted(chains.items()):
        counts[chain_id] = sum(len(v) for v in by_seq.values())
        findings += _check_chain(chain_id, by_seq, from_start)
    return Report(counts, findings)


def _check_chain(
    chain_id: str, by_seq: Mapping[int, list[Mapping[str, Any]]], from_start: bool
) -> list[Finding]:
    findings: list[Finding] = []

    def find(seq: int, kind: str, detail: str) -> None:
        findings.append(Finding(chain_id, seq, kind, detail))

    seqs = sorted(by_seq)
    expected = 1 if from_start else seqs[0]
    for seq in seqs:
        if seq > expected:
            gap = f"{expected}" if seq - 1 == expected else f"{expected}-{seq - 1}"
            find(expected, "missing", f"seq {gap} not in the table (deleted rows)")
        expected = seq + 1
        copies = by_seq[seq]
        if len({canonical(r, True) + str(r.get("row_hash")).encode() for r in copies}) > 1:
            find(seq, "conflict", f"{len(copies)} different rows share this seq")
        row = copies[0]
        if row_hash(row, json_parsed=True) != row.get("row_hash"):
            find(seq, "edited", "row_hash does not match the row (row edited)")
        before = by_seq.get(seq - 1)
        link = GENESIS if seq == 1 else (before[0].get("row_hash") if before else None)
        if link is not None and row.get("prev_hash") != link:
            find(seq, "broken_link", f"prev_hash does not match seq {seq - 1}'s row_hash")
    return findings
