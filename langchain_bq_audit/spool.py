"""Durable local segments of rows not yet written to BigQuery, and of rows it rejected.

Layout: one folder per destination (mode 0700) holding append-only segment files (mode
0600). A record is one line: 8 hex digits of the CRC-32 of the JSON that follows, a space,
the JSON, a newline. A torn tail left by a crash fails its checksum (or has no newline) and
is skipped and counted, never misread. A process holds an exclusive `flock` on the segment
it is appending to, so other processes replay only segments nobody is writing; a crashed
process's lock goes with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process locking
    fcntl = None  # type: ignore[assignment]

SEGMENT_SUFFIX = ".seg"
DEAD_LETTER_DIR = "dead-letter"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def default_spool_dir() -> Path:
    """`$XDG_CACHE_HOME/langchain-bq-audit/spool` (or `~/.cache/...`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "langchain-bq-audit" / "spool"


def destination_dir(root: Path, destination: str) -> Path:
    """The folder of one destination (`project.dataset.table`) under the spool root."""
    return root / _SAFE.sub("_", destination)


def encode(record: dict[str, Any]) -> bytes:
    """One spool line for `record`."""
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> dict[str, Any] | None:
    """The record of one line, or None when the line is torn or corrupt."""
    if len(line) < 11 or not line.endswith(b"\n") or line[8:9] != b" ":
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


@dataclass
class SegmentContents:
    """What one segment holds: its good records and how many lines were unreadable."""

    path: Path
    records: list[dict[str, Any]]
    corrupt: int


def read_segment(path: Path) -> SegmentContents:
    """Every intact record of a segment; torn or corrupt lines are counted and skipped."""
    records: list[dict[str, Any]] = []
    corrupt = 0
    with open(path, "rb") as f:
        for line in f:
            record = decode(line)
            if record is None:
                corrupt += 1
            else:
                records.append(record)
    return SegmentContents(path, records, corrupt)


def _lock(fd: int, blocking: bool = False) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _open_private(path: Path, flags: int) -> int:
    return os.open(path, flags, 0o600)


class Spool:
    """The spool of one destination in this process: append, list, claim and remove.

    Thread-safe. `max_bytes` bounds the whole folder; `append` refuses beyond it.
    """

    def __init__(self, root: Path, destination: str, max_bytes: int,
                 segment_bytes: int = 8_000_000) -> None:  # fmt: skip
        self.dir = destination_dir(root, destination)
        self.dead_dir = self.dir / DEAD_LETTER_DIR
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._seq = 0
        self._total: int | None = None  # bytes in the folder, computed once, then tracked

    # -- writing ---------------------------------------------------------------------------

    def _ensure_dirs(self) -> None:
        for d in (self.dir.parent.parent, self.dir.parent, self.dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def _new_segment(self, folder: Path) -> tuple[int, Path]:
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}{SEGMENT_SUFFIX}"
        path = folder / name
        fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL)
        _lock(fd)
        return fd, path

    def append(self, records: list[dict[str, Any]]) -> int:
        """Append records durably (one `write` + `fsync` per call). Returns how many fit."""
        if not records:
            return 0
        lines = [encode(r) for r in records]
        with self._lock:
            self._ensure_dirs()
            if self._total is None:
                self._total = self.size_bytes()
            room = self.max_bytes - self._total
            taken = 0
            size = 0
            for line in lines:
                if size + len(line) > room:
                    break
                size += len(line)
                taken += 1
            if not taken:
                return 0
            if self._fd is None or self._size >= self.segment_bytes:
                self._close_active()
                self._fd, self._path = self._new_segment(self.dir)
                self._size = 0
            data = b"".join(lines[:taken])
            os.write(self._fd, data)
            os.fsync(self._fd)
            self._size += len(data)
            self._total += len(data)
            return taken

    def dead_letter(self, rows: list[dict[str, Any]], errors: list[str]) -> None:
        """Keep rows BigQuery rejected for good, each with its error, in `dead-letter/`."""
        with self._lock:
            self._ensure_dirs()
            self.dead_dir.mkdir(mode=0o700, exist_ok=True)
            fd, _ = self._new_segment(self.dead_dir)
            try:
                data = b"".join(
                    encode({"error": e, "row": r}) for r, e in zip(rows, errors, strict=True)
                )
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases our flock: the segment is now replayable
            self._fd = None
            self._path = None

    def seal(self) -> None:
        """Close the segment being appended to, so it can be replayed."""
        with self._lock:
            self._close_active()

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's segment without touching its lock."""
        self._lock = threading.Lock()
        self._fd = None  # the parent keeps its descriptor (and lock); ours closes at exit
        self._path = None
        self._total = None

    # -- reading ---------------------------------------------------------------------------

    def segments(self) -> list[Path]:
        """Segments waiting for replay, oldest first (including ones other processes hold)."""
        try:
            return sorted(p for p in self.dir.glob(f"*{SEGMENT_SUFFIX}") if p.is_file())
        except OSError:
            return []

    def dead_letters(self) -> list[Path]:
        try:
            return sorted(self.dead_dir.glob(f"*{SEGMENT_SUFFIX}"))
        except OSError:
            return []

    def size_bytes(self) -> int:
        total = 0
        for path in self.segments():
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    def pending(self) -> bool:
        """True when there is something to replay (cheap: one directory listing)."""
        active = self._path
        return any(p != active for p in self.segments())

    def claim(self) -> Iterator[tuple[SegmentContents, Any]]:
        """Yield each replayable segment with a `done()` callback, holding its lock meanwhile.

        Segments locked by a live writer (ours or another process's) are skipped. Call
        `done()` once its records are all written: the segment is deleted.
        """
        for path in self.segments():
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                if not _lock(fd):
                    continue
                if not path.exists():  # replayed and removed by someone else meanwhile
                    continue
                contents = read_segment(path)

                def done(path: Path = path) -> int:
                    """Delete the replayed segment; returns its size in bytes."""
                    try:
                        size = path.stat().st_size
                        path.unlink()
                    except OSError:
                        return 0
                    with self._lock:
                        if self._total is not None:
                            self._total = max(0, self._total - size)
                    return size

                yield contents, done
            finally:
                os.close(fd)
