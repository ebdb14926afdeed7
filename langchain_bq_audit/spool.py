"""Durable local segments of rows not yet written to BigQuery, and of rows it rejected.

Layout: one folder per destination (mode 0700) holding append-only segment files (mode
0600). A record is one line: 8 hex digits of the CRC-32 of the JSON that follows, a space,
the JSON, a newline. A torn tail left by a crash fails its checksum (or has no newline) and
is skipped and counted, never misread. A process holds an exclusive `flock` on the segment
it is appending to, so other processes replay only segments nobody is writing; a crashed
process's lock goes with it.

Faults: a short write or a full disk (ENOSPC) truncates the segment back to its last whole
record and raises `SpoolWriteError` saying how many records did land; the next append
starts a new segment. A segment replayed but impossible to remove (a read-only remount) is
remembered as done by this process and never claimed again.
"""

from __future__ import annotations

import contextlib
import errno
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


class SpoolWriteError(OSError):
    """An append that stored only the first `taken` records (disk full, I/O error)."""

    def __init__(self, taken: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.taken = taken
        self.cause = cause


def default_spool_dir() -> Path:
    """`$XDG_CACHE_HOME/langchain-bq-audit/spool` (or `~/.cache/...`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "langchain-bq-audit" / "spool"


def destination_dir(root: Path, destination: str) -> Path:
    """The folder of one destination (`project.dataset.table`) under the spool root."""
    return root / _SAFE.sub("_", destination)


def spooled_destinations(root: Path) -> list[tuple[str, str, str]]:
    """(project, dataset, table) of every destination with a folder under the spool root.

    The project `default` stands for the client's default project (ADC with no project
    named when the rows were spooled).
    """
    out = []
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []
    for folder in folders:
        parts = folder.name.rsplit(".", 2)
        if len(parts) == 3 and all(parts):
            out.append((parts[0], parts[1], parts[2]))
    return out


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


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data`: `os.write` may store less than asked (a disk filling up)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - a regular file never does this
            raise OSError(errno.ENOSPC, "short write")
        view = view[n:]


def _whole(lines: list[bytes], nbytes: int) -> tuple[int, int]:
    """How many of `lines` fit whole in their first `nbytes`, and their size."""
    taken = size = 0
    for line in lines:
        if size + len(line) > nbytes:
            break
        size += len(line)
        taken += 1
    return taken, size


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
        self._done: set[str] = set()  # replayed but not removable (read-only): never again
        self.undeletable: list[tuple[str, str]] = []  # (segment, why) not yet reported

    # -- writing ---------------------------------------------------------------------------

    def check(self) -> None:
        """Raise `OSError` with a clear message if the spool folders cannot be used."""
        for d in (self.dir.parent, self.dir, self.dead_dir):
            if d.is_symlink():
                raise OSError(errno.ELOOP, f"spool folder {d} is a symlink; refused (use the "
                                           "real path as spool_dir)")  # fmt: skip
            if d.exists() and not d.is_dir():
                raise OSError(errno.ENOTDIR, f"spool folder {d} exists and is not a folder")
        # the nearest folder that exists is where the rest is made: a file there (`spool_dir`
        # under a file) fails only at the first append, during an outage
        above = next((p for p in self.dir.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise OSError(errno.ENOTDIR, f"spool folder {self.dir} cannot be made: {above} "
                                         "is not a folder")  # fmt: skip

    def _ensure_dirs(self) -> None:
        self.check()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.dir.parent, self.dir):  # private even where it already existed
            if d.stat().st_mode & 0o777 != 0o700:
                os.chmod(d, 0o700)

    def _new_segment(self, folder: Path) -> tuple[int, Path]:
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}{SEGMENT_SUFFIX}"
        path = folder / name
        fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL)
        _lock(fd)
        return fd, path

    def append(self, records: list[dict[str, Any]]) -> int:
        """Append records durably (one `write` + `fsync` per call). Returns how many fit.

        Raises `SpoolWriteError` (with `taken`, the records stored) when the disk fails
        part way; the segment then ends at the last whole record.
        """
        if not records:
            return 0
        lines = [encode(r) for r in records]
        with self._lock:
            self._ensure_dirs()
            if self._fd is not None and not self._still_there(self._fd, self._path):
                # the folder or segment was deleted (a cache cleaner): what we appended
                # there is gone, and records appended to it now would be lost at close
                self._close_active()
                self._total = None
            if self._total is None:
                self._total = self.size_bytes()
            taken, size = _whole(lines, self.max_bytes - self._total)
            if not taken:
                return 0
            if self._fd is None or self._size >= self.segment_bytes:
                self._close_active()
                self._fd, self._path = self._new_segment(self.dir)
                self._size = 0
            fd = self._fd
            try:
                _write_all(fd, b"".join(lines[:taken]))
                os.fsync(fd)
            except OSError as exc:
                done, size = self._cut_back(fd, lines[:taken])
                self._total += size
                raise SpoolWriteError(done, exc) from exc
            self._size += size
            self._total += size
            return taken

    @staticmethod
    def _still_there(fd: int, path: Path | None) -> bool:
        """True when `path` is still the file open as `fd` (one `stat`, beside the fsync)."""
        try:
            here, ours = os.stat(path) if path else None, os.fstat(fd)
        except OSError:
            return False
        return here is not None and (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)

    def _cut_back(self, fd: int, lines: list[bytes]) -> tuple[int, int]:
        """After a failed append of `lines`: keep the whole records it wrote (a disk that
        fills up part way keeps what fit, not nothing), drop its torn tail and close the
        segment, so the next append starts a new one instead of gluing a record onto a torn
        line. Returns (records kept, their bytes)."""
        try:
            end = os.fstat(fd).st_size
        except OSError:
            end = self._size
        done, size = _whole(lines, max(0, end - self._size))
        try:
            os.ftruncate(fd, self._size + size)  # the end of the last whole record
            os.fsync(fd)
        except OSError:
            try:  # not durable: back to the last whole record before this append
                os.ftruncate(fd, self._size)
                done, size = 0, 0
            except OSError:  # cannot truncate: whole records stay readable, a torn one is skipped
                pass
        if self._size + size == 0 and self._path is not None:
            # a segment this append began and nothing fit in: not one empty file per batch
            # while the disk stays full
            with contextlib.suppress(OSError):
                self._path.unlink()
        self._close_active()
        return done, size

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
                _write_all(fd, data)
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
            found = self.dir.glob(f"*{SEGMENT_SUFFIX}")
            return sorted(p for p in found if p.name not in self._done and p.is_file())
        except OSError:
            return []

    def replayed_not_removed(self) -> int:
        """Segments this process replayed that are still on disk (a read-only spool)."""
        return sum(1 for name in set(self._done) if (self.dir / name).is_file())

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
                    except FileNotFoundError:
                        return 0
                    except OSError as exc:  # read-only: never send it again from here
                        self._done.add(path.name)
                        self.undeletable.append((str(path), str(exc)))
                        return 0
                    with self._lock:
                        if self._total is not None:
                            self._total = max(0, self._total - size)
                    return size

                yield contents, done
            finally:
                os.close(fd)
