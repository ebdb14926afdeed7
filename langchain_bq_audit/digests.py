"""Signed digests of the hash chains: tamper evidence that a table editor cannot forge.

The hash chain (integrity.py) is unkeyed: whoever can run DML on the table can recompute
SHA-256, so an edited row with a recomputed `row_hash`, a re-linked suffix, an appended row
or a deleted tail all verify clean. As AWS CloudTrail does for its log files, the writer
therefore signs a *digest* of its chain every `digest_every_rows` rows or `digest_every_s`
seconds, and at close: chain id, the seq range covered, the `row_hash` at its last seq, the
row count, the time, whether the chain was closed, the signing key's id and the previous
digest's signature. With Ed25519 (the `cryptography` library, extra `signing`) and a key
that stays with the application, a forger without the key can neither make nor alter a
digest, and `last_row_hash` pins every row up to `last_seq` through the chain's links.

Digests go to their own table (`<table>_digests`, with IAM of its own) and optionally to a
local JSON-lines file. `check` tells what a set of rows and digests proves; what comes after
a chain's last digest is not covered by any signature, and it says so.

`cryptography` is imported only when a key is used.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .integrity import Finding, _micros

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from .settings import AuditSettings

# What a signature covers: a domain tag (a signature made for anything else never verifies
# here), then these fields as canonical JSON. Adding a field means a new version tag.
_DOMAIN = b"langchain-bq-audit digest v1\n"
SIGNED_FIELDS = (
    "chain_id", "digest_seq", "first_seq", "last_seq", "row_count", "last_row_hash", "time",
    "closed", "key_id", "prev_signature",
)  # fmt: skip
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode


def _require_crypto() -> None:
    """Raise an ImportError saying what to install when `cryptography` is missing."""
    import importlib.util

    if importlib.util.find_spec("cryptography") is None:  # it comes with google-auth
        raise ImportError(
            "signed digests need the cryptography library: "
            "pip install 'langchain-bq-audit[signing]'"
        )


# -- keys ------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key's id in digests: the first 16 hex digits of SHA-256 of its 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization as ser

    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def private_key_from_text(text: str | bytes, what: str = "digest key") -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8) or base64 of its 32 raw bytes.

    Raises ValueError naming `what` (never echoing the key) when it is neither.
    """
    _require_crypto()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    data = text.encode() if isinstance(text, str) else text
    try:
        if b"-----BEGIN" in data:
            key = ser.load_pem_private_key(data, password=None)
        else:
            raw = base64.b64decode(data.strip(), validate=True)
            key = ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(
            f"{what} is not an Ed25519 private key (PEM or base64 of 32 bytes): "
            f"{type(exc).__name__}"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{what} is a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_private_key(settings: AuditSettings) -> Ed25519PrivateKey:
    """The signing key of `settings` (`digest_key_file` or `digest_key`).

    Raises ValueError when the file cannot be read or holds no Ed25519 private key.
    """
    if settings.digest_key_file:
        path = Path(settings.digest_key_file).expanduser()
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"digest_key_file {path}: {exc.strerror or exc}") from None
        return private_key_from_text(text, f"digest_key_file {path}")
    if settings.digest_key:
        return private_key_from_text(settings.digest_key, "digest_key (BQ_AUDIT_DIGEST_KEY)")
    raise ValueError("no digest key: set digest_key_file or digest_key")


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from a file: PEM (what `bq-audit keygen` writes) or base64 of
    its 32 raw bytes. Raises ValueError when it is neither."""
    _require_crypto()
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"public key {path}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN" in data:
            key = ser.load_pem_public_key(data)
        else:
            key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip()))
    except Exception as exc:  # cryptography raises several kinds for a bad key
        raise ValueError(f"public key {path} is not an Ed25519 public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"public key {path} is a {type(key).__name__}, not Ed25519")
    return key


def generate_key(private_path: str | os.PathLike[str]) -> tuple[str, Path]:
    """Write a new Ed25519 key: the private key to `private_path` (PEM, mode 0600, never
    over an existing file) and the public key to `<private_path>.pub` (PEM).

    Returns (key id, public key path). Raises FileExistsError rather than overwrite.
    """
    _require_crypto()
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    path = Path(private_path).expanduser()
    pub_path = path.with_name(path.name + ".pub")
    if pub_path.exists():
        raise FileExistsError(f"{pub_path} exists; keygen never overwrites a key")
    # O_EXCL: never replace a key whose digests may still need verifying
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private)
    pub_path.write_bytes(public)
    return key_id(key.public_key()), pub_path


# -- digests ---------------------------------------------------------------------------------


def canonical(digest: Mapping[str, Any]) -> bytes:
    """The bytes a digest's signature is over: the domain tag, then `SIGNED_FIELDS` as
    sorted compact JSON, `time` as integer microseconds (as it comes back from BigQuery,
    a datetime, or as written, ISO text)."""
    out = {name: digest.get(name) for name in SIGNED_FIELDS}
    out["time"] = _micros(out["time"])
    return _DOMAIN + _ENCODE(out).encode("ascii")


def sign(digest: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Set the digest's `key_id` and `signature` (hex), in place; returns it."""
    digest["key_id"] = key_id(key.public_key())
    digest["signature"] = key.sign(canonical(digest)).hex()
    return digest


def signature_ok(digest: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    """True when `digest` carries a valid signature by `public_key` over its fields."""
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(bytes.fromhex(str(digest.get("signature") or "")), canonical(digest))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class Digester:
    """Signs digests of one hash chain as its rows are linked. Thread-safe.

    `observe` is called with each row after `HashChain.link`; a digest is made when
    `every_rows` rows are not covered yet, by a timer `every_s` after the first of them, and
    by `close`. Each digest goes to `emit` (a row for the digests table).
    """

    def __init__(
        self,
        key: Ed25519PrivateKey,
        every_rows: int,
        every_s: float,
        emit: Callable[[dict[str, Any]], None],
        closed: Callable[[float | None], object] | None = None,
    ) -> None:
        self._key = key
        self._every_rows = every_rows
        self._every_s = every_s
        self._emit = emit
        self._on_close = closed  # after the closing digest: closes where digests go
        self._lock = threading.Lock()
        self._chain_id: str | None = None
        self._last_seq = 0  # the highest seq observed, and its row_hash
        self._last_hash = ""
        self._signed_seq = 0  # the last seq a digest covers
        self._digest_seq = 0
        self._prev_signature: str | None = None
        self._closed = False  # the last digest was a closing one
        self._timer: threading.Timer | None = None

    @classmethod
    def for_writer(cls, settings: AuditSettings, client: Any = None) -> Digester | None:
        """The digester of a writer with `settings` (None without a digest key): digests go
        to the writer of `<table>_digests` (same client) and to `digest_file` if set.

        Raises ValueError (bad or unreadable key) or ImportError (no cryptography).
        """
        if not settings.signs_digests or not settings.hash_chain:
            return None
        key = load_private_key(settings)
        target = settings.replace(
            table=settings.digest_table, hash_chain=False, digest_key=None,
            digest_key_file=None, digest_file=None, auto_create=False, sink="insert_all",
            writer_process=False,
        )  # fmt: skip
        local = Path(settings.digest_file).expanduser() if settings.digest_file else None

        def emit(digest: dict[str, Any]) -> None:
            from .registry import get_writer

            if local is not None:
                append_digest_file(local, digest)
            get_writer(target, client).submit(digest)

        def closed(timeout: float | None) -> bool:
            from .registry import get_writer

            return get_writer(target, client).close(timeout)

        return cls(key, settings.digest_every_rows, settings.digest_every_s, emit, closed)

    def observe(self, row: Mapping[str, Any]) -> None:
        """Note a linked row (`chain_id`, `seq`, `row_hash`); sign a digest when one is due."""
        seq = int(row["seq"])
        with self._lock:
            self._chain_id = str(row["chain_id"])
            if seq > self._last_seq:  # rows may be linked by two threads: keep the highest
                self._last_seq, self._last_hash = seq, str(row["row_hash"])
            if self._last_seq <= self._signed_seq:
                return
            if self._last_seq - self._signed_seq >= self._every_rows:
                self._digest(closed=False)
            elif self._timer is None:
                timer = threading.Timer(self._every_s, self._on_timer)
                timer.daemon = True
                self._timer = timer
                timer.start()

    def close(self, timeout: float | None = 10.0) -> None:
        """Sign the closing digest (unless the last one already covers everything and was
        closing), then close the digests table's writer within `timeout`."""
        with self._lock:
            if self._chain_id is not None and (
                self._last_seq > self._signed_seq or not self._closed
            ):
                self._digest(closed=True)
        if self._on_close is not None and self._digest_seq:
            self._on_close(timeout)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            if self._last_seq > self._signed_seq:
                self._digest(closed=False)

    def _digest(self, closed: bool) -> None:
        """Sign and emit a digest up to the highest seq seen. Call with `_lock` held."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._digest_seq += 1
        first = self._signed_seq + 1
        now = _dt.datetime.now(_dt.timezone.utc)
        digest: dict[str, Any] = {
            "time": now.isoformat(timespec="microseconds"),
            "event_id": f"{self._chain_id}:{self._digest_seq}",
            "chain_id": self._chain_id,
            "digest_seq": self._digest_seq,
            # a closing digest with no new row re-signs the last seq (first_seq > last_seq)
            "first_seq": min(first, self._last_seq),
            "last_seq": self._last_seq,
            "row_count": self._last_seq - first + 1,
            "last_row_hash": self._last_hash,
            "closed": closed,
            "prev_signature": self._prev_signature,
        }
        sign(digest, self._key)
        self._signed_seq = self._last_seq
        self._prev_signature = digest["signature"]
        self._closed = closed
        try:
            self._emit(digest)
        except Exception:  # never into the writer's thread; the next digest links past it
            import logging

            logging.getLogger(__name__).warning(
                "langchain-bq-audit: digest %s could not be queued", digest["event_id"],
                exc_info=True,
            )  # fmt: skip


def append_digest_file(path: Path, digest: Mapping[str, Any]) -> None:
    """Append one digest as a JSON line to `path` (created 0600), fsynced."""
    line = (json.dumps(dict(digest), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_digest_file(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The digests of a JSON-lines file (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    for line in Path(path).expanduser().read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# -- verification ----------------------------------------------------------------------------


@dataclass
class DigestReport:
    """What the signed digests prove about the rows: valid digests per chain, findings
    (exit 1), and `unproven`: rows no signature covers, said plainly."""

    digests: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    unproven: list[str] = field(default_factory=list)


def _range(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}-{b}"


def check(
    rows: Iterable[Mapping[str, Any]],
    digests: Iterable[Mapping[str, Any]],
    public_keys: Mapping[str, Ed25519PublicKey],
    from_start: bool = True,
) -> DigestReport:
    """Check `rows` (with `chain_id`, `seq`, `row_hash`) against signed `digests`.

    `public_keys` maps key id to public key: a digest signed by another key, or whose
    signature does not verify, is a finding and proves nothing. For each valid digest, the
    row at its `last_seq` must be there with the `row_hash` it signed; rows after a closing
    digest were appended; a chain with digests and no rows was deleted; a chain with no valid
    digest is unsigned. Combine with `integrity.verify`, which checks every row's hash and
    link. With `from_start` False (a time window), chains absent from `rows` are not
    reported deleted and digests ending before a chain's first row in `rows` are skipped.
    """
    seqs: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for row in rows:
        if row.get("chain_id") is not None and row.get("seq") is not None:
            seqs[str(row["chain_id"])][int(row["seq"])].add(str(row.get("row_hash")))
    report = DigestReport()
    valid: dict[str, dict[int, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    seen: set[str] = set()
    for digest in digests:
        chain_id = str(digest.get("chain_id"))
        number = int(digest.get("digest_seq") or 0)
        signature = str(digest.get("signature"))
        if signature in seen:  # the same digest twice (a retry, a replay, the local file)
            continue
        seen.add(signature)
        last = int(digest.get("last_seq") or 0)
        key = public_keys.get(str(digest.get("key_id")))
        if key is None:
            report.findings.append(Finding(chain_id, last, "unknown_key",
                f"digest {number} is signed by key {digest.get('key_id')}, not one of the "
                "given public keys: it proves nothing"))  # fmt: skip
        elif not signature_ok(digest, key):
            report.findings.append(Finding(chain_id, last, "forged_digest",
                f"digest {number} does not carry a valid signature of key "
                f"{digest.get('key_id')} (forged or altered digest)"))  # fmt: skip
        else:
            valid[chain_id][number].append(digest)
    for chain_id in sorted(set(seqs) | set(valid)):
        report.findings += _check_chain(chain_id, seqs.get(chain_id, {}), valid.get(chain_id),
                                        from_start, report)  # fmt: skip
    return report


def _check_chain(
    chain_id: str,
    rows: Mapping[int, set[str]],
    by_number: Mapping[int, list[Mapping[str, Any]]] | None,
    from_start: bool,
    report: DigestReport,
) -> list[Finding]:
    findings: list[Finding] = []

    def find(seq: int, kind: str, detail: str) -> None:
        findings.append(Finding(chain_id, seq, kind, detail))

    if not by_number:
        find(min(rows), "unsigned", "no valid signed digest covers this chain: its rows "
             "cannot be proven (written without a digest key, cut off before its first "
             "digest, or forged)")  # fmt: skip
        return findings
    report.digests[chain_id] = len(by_number)
    numbers = sorted(by_number)
    prev: Mapping[str, Any] | None = None
    for number in numbers:
        copies = by_number[number]
        if len(copies) > 1:
            find(
                int(copies[0]["last_seq"]),
                "conflict",
                f"{len(copies)} different validly signed digests share number {number}",
            )
        digest = copies[0]
        if prev is not None and int(prev["digest_seq"]) == number - 1:
            if digest.get("prev_signature") != prev.get("signature"):
                find(
                    int(digest["last_seq"]),
                    "digest_broken_link",
                    f"digest {number} does not name digest {number - 1}'s signature",
                )
        elif (prev is not None or from_start) and number > 1:
            before = 1 if prev is None else int(prev["digest_seq"]) + 1
            find(
                int(digest["first_seq"]),
                "digest_missing",
                f"digest {_range(before, number - 1)} not found (deleted digests)",
            )
        prev = digest
    if not rows:
        if from_start:
            last = max(int(by_number[n][0]["last_seq"]) for n in numbers)
            find(1, "chain_deleted", f"no row in the table, though {len(numbers)} signed "
                 f"digest(s) cover seq 1-{last} (the whole chain was deleted)")  # fmt: skip
        return findings
    first_row, last_row = min(rows), max(rows)
    for number in numbers:
        digest = by_number[number][0]
        last = int(digest["last_seq"])
        if last < first_row and not from_start:
            continue  # before the window
        hashes = rows.get(last)
        if hashes is None:
            continue  # a gap (integrity.verify reports it) or the tail, below
        if hashes != {digest["last_row_hash"]}:
            find(last, "digest_mismatch",
                 f"row_hash is not the one digest {number} signed: rows up to seq {last} "
                 "were rewritten (hashes recomputed)")  # fmt: skip
    latest = by_number[numbers[-1]][0]
    signed = int(latest["last_seq"])
    if signed > last_row:
        find(
            last_row + 1,
            "tail_deleted",
            f"seq {_range(last_row + 1, signed)} not in the table, though digest "
            f"{numbers[-1]} signed up to seq {signed} (the chain's tail was deleted)",
        )
    elif last_row > signed:
        after = _range(signed + 1, last_row)
        if latest.get("closed"):
            find(signed + 1, "appended",
                 f"seq {after} come after the chain's closing digest {numbers[-1]} "
                 "(rows appended after the writer closed)")  # fmt: skip
        else:
            report.unproven.append(
                f"chain {chain_id}: seq {after} were written after its last digest "
                f"({numbers[-1]}, at {latest.get('time')}): no signature covers them yet, so "
                "an edit, a deletion or an appended row among them cannot be shown"
            )
    return findings
