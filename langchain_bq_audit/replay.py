"""Replay: spooled rows back to BigQuery, oldest segment first.

One function, used by the sender thread (at start, for what earlier processes left, and
when BigQuery answers again after an outage) and by `bq-audit replay`. Segments are cut
into batches by the same rule as live sending (`batches`), so no request exceeds
`batch_rows` rows or `batch_bytes` bytes. A record that is not a row (no `event_id`) is
handed to `reject` (the dead letters) and skipped; a torn or corrupt line is counted.
A segment is removed only once every one of its rows was written or rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .rows import row_size
from .spool import Spool


def batches(rows: list[dict[str, Any]], max_rows: int, max_bytes: int) -> Iterator[list[Any]]:
    """`rows` in order, cut where a batch would pass `max_rows` rows or `max_bytes` bytes
    (`row_size`); a single row larger than `max_bytes` goes alone."""
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        n = row_size(row)
        if batch and (len(batch) >= max_rows or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += n
    if batch:
        yield batch


def is_row(record: dict[str, Any]) -> bool:
    """True for a record that can be sent as a row: it has its insert id (`event_id`)."""
    return isinstance(record.get("event_id"), str)


def replay(
    spool: Spool,
    deliver: Callable[[list[dict[str, Any]]], bool],
    reject: Callable[[list[dict[str, Any]], list[str]], None],
    *,
    max_rows: int,
    max_bytes: int,
    stop: Callable[[], bool],
    corrupt: Callable[[int], None],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Send every replayable segment until done, `stop()` says so, or `deliver` fails.

    `deliver(batch)` is True once each row of `batch` was written or dead-lettered (it
    does its own counting); `reject(records, errors)` keeps records that are not rows;
    `corrupt(n)` counts unreadable lines. Returns the rows handed to `deliver` for segments
    finished. `progress(done_bytes, total_bytes)` is called after each segment.
    """
    spool.seal()  # what we spooled ourselves during an outage becomes replayable too
    if not spool.pending():
        return 0
    sent = 0
    total = spool.size_bytes()
    done_bytes = 0
    for contents, done in spool.claim():
        if stop():
            break
        if contents.corrupt:
            corrupt(contents.corrupt)
        rows = [r for r in contents.records if is_row(r)]
        for batch in batches(rows, max_rows, max_bytes):
            if not deliver(batch):
                return sent
        odd = [r for r in contents.records if not is_row(r)]
        if odd:  # once the segment is otherwise done, so they are kept once
            reject(odd, ["spool record is not a row (no event_id)"] * len(odd))
        sent += len(rows)
        done_bytes += done()
        if progress is not None:
            progress(done_bytes, total)
    return sent
