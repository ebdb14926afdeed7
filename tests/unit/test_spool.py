"""The spool under real disk faults: a full tmpfs, a read-only remount, torn and odd records,
locks held by another process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from langchain_bq_audit.spool import Spool, SpoolWriteError, encode, read_segment

from ..conftest import remount

DEST = "p.language_model_logging.t"


def row(i: int, pad: int = 0) -> dict[str, object]:
    return {"event_id": f"e{i}", "timestamp": "2026-11-30T00:00:00Z", "input_text": "x" * pad}


def all_records(spool: Spool) -> list[dict[str, object]]:
    return [r for p in spool.segments() for r in read_segment(p).records]


def test_a_disk_that_fills_up_keeps_only_whole_records_and_says_how_many(tmpfs) -> None:
    root = tmpfs(256 * 1024)
    spool = Spool(root, DEST, max_bytes=10**9)
    stored = 0
    failures = 0
    for i in range(0, 400, 10):  # 10 rows of ~2 KB per append: the disk fills part way
        try:
            stored += spool.append([row(j, 2000) for j in range(i, i + 10)])
        except SpoolWriteError as exc:
            failures += 1
            assert 0 <= exc.taken < 10
            stored += exc.taken
    assert failures >= 1, "the tmpfs should have filled up"
    spool.seal()
    records = all_records(spool)
    corrupt = sum(read_segment(p).corrupt for p in spool.segments())
    # every record counted as stored is readable, nothing more, and nothing is torn
    assert (len(records), corrupt) == (stored, 0)
    assert [r["event_id"] for r in records] == [f"e{j}" for j in range(stored)][: len(records)]


def test_one_large_append_on_a_nearly_full_disk_keeps_what_fit(tmpfs) -> None:
    """The exit drain spools everything it holds in one append: on a disk with room for
    some of it, those are kept (and counted), not thrown away with the rest."""
    root = tmpfs(256 * 1024)
    (root / "filler").write_bytes(b"\0" * (150 * 1024))  # someone else's file
    spool = Spool(root, DEST, max_bytes=10**9)
    with pytest.raises(SpoolWriteError) as info:
        spool.append([row(j, 2000) for j in range(200)])  # ~400 KB, ~100 KB free
    kept = info.value.taken
    assert 20 <= kept < 200, kept  # most of the free space holds whole records
    spool.seal()
    records = all_records(spool)
    assert [r["event_id"] for r in records] == [f"e{j}" for j in range(kept)]
    assert sum(read_segment(p).corrupt for p in spool.segments()) == 0


def test_after_space_is_freed_the_next_append_starts_clean(tmpfs) -> None:
    root = tmpfs(128 * 1024)
    spool = Spool(root, DEST, max_bytes=10**9)
    filler = root / "filler"
    filler.write_bytes(b"\0" * (100 * 1024))
    with pytest.raises(SpoolWriteError) as info:
        spool.append([row(j, 3000) for j in range(20)])
    first = info.value.taken
    filler.unlink()  # the operator frees space
    assert spool.append([row(100 + j) for j in range(5)]) == 5
    spool.seal()
    records = all_records(spool)
    assert len(records) == first + 5
    assert [r["event_id"] for r in records[-5:]] == [f"e{100 + j}" for j in range(5)]
    assert sum(read_segment(p).corrupt for p in spool.segments()) == 0


def test_a_replayed_segment_that_cannot_be_removed_is_never_claimed_again(tmpfs) -> None:
    root = tmpfs(1024 * 1024)
    earlier = Spool(root, DEST, max_bytes=10**9)  # an app that spooled and ended
    earlier.append([row(i) for i in range(40)])
    earlier.seal()
    remount(root, "ro")
    try:
        spool = Spool(root, DEST, max_bytes=10**9)
        claimed = []
        for contents, done in spool.claim():
            claimed.append(len(contents.records))
            assert done() == 0  # read-only: not removed
        assert claimed == [40]
        assert [why for _, why in spool.undeletable] and "Read-only" in spool.undeletable[0][1]
        assert not spool.pending() and list(spool.claim()) == []  # never again
        assert spool.size_bytes() == 0
    finally:
        remount(root, "rw")


def test_the_spool_refuses_a_symlinked_folder_and_keeps_its_folders_private(tmp_path) -> None:
    root = tmp_path / "spool"
    real = tmp_path / "elsewhere"
    real.mkdir()
    root.mkdir(mode=0o755)
    (root / DEST).symlink_to(real)
    with pytest.raises(OSError, match="symlink"):
        Spool(root, DEST, max_bytes=10**9).append([row(1)])
    (root / DEST).unlink()
    spool = Spool(root, DEST, max_bytes=10**9)
    spool.append([row(1)])
    spool.dead_letter([row(2)], ["invalid"])
    for folder in (root, spool.dir, spool.dead_dir):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    for seg in [*spool.dir.glob("*.seg"), *spool.dead_dir.glob("*.seg")]:
        assert seg.stat().st_mode & 0o777 == 0o600


def test_a_spool_folder_under_a_file_is_found_by_the_check(tmp_path) -> None:
    """`spool_dir` under a regular file (a typo, a file where a folder was meant) cannot be
    made: the check a handler runs at construction says so, not the first outage."""
    (tmp_path / "a-file").write_text("not a folder")
    spool = Spool(tmp_path / "a-file" / "spool", DEST, max_bytes=10**9)
    with pytest.raises(OSError, match="not a folder"):
        spool.check()


def test_a_torn_tail_is_counted_and_the_good_records_before_it_kept(tmp_path) -> None:
    spool = Spool(tmp_path, DEST, max_bytes=10**9)
    spool.append([row(i) for i in range(3)])
    spool.seal()
    (seg,) = spool.segments()
    with open(seg, "ab") as f:
        f.write(encode(row(3))[:-7])  # a crash in the middle of a write
    contents = read_segment(seg)
    assert ([r["event_id"] for r in contents.records], contents.corrupt) == (["e0", "e1", "e2"], 1)


def test_the_spool_budget_refuses_beyond_max_spool_bytes(tmp_path) -> None:
    one = len(encode(row(0)))
    spool = Spool(tmp_path, DEST, max_bytes=one * 3 + 1)
    assert spool.append([row(i) for i in range(5)]) == 3
    assert spool.append([row(9)]) == 0


def test_a_segment_another_process_is_appending_to_is_not_claimed(tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from langchain_bq_audit.spool import Spool
            s = Spool(Path({str(tmp_path)!r}), {DEST!r}, max_bytes=10**9)
            s.append([{{"event_id": "held", "timestamp": "t"}}])
            print("ready", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        spool = Spool(tmp_path, DEST, max_bytes=10**9)
        spool.append([row(1)])
        spool.seal()
        claimed = [[r["event_id"] for r in c.records] for c, _ in spool.claim()]
        assert claimed == [["e1"]]  # ours; the other process's open segment is skipped
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(120)
    spool = Spool(tmp_path, DEST, max_bytes=10**9)
    claimed = [[r["event_id"] for r in c.records] for c, _ in spool.claim()]
    assert ["held"] in claimed  # its lock went with it: now replayable


def test_segments_are_listed_oldest_first(tmp_path) -> None:
    spool = Spool(tmp_path, DEST, max_bytes=10**9)
    for i in range(3):
        spool.append([row(i)])
        spool.seal()
    names = [p.name for p in spool.segments()]
    assert names == sorted(names)
    assert [read_segment(p).records[0]["event_id"] for p in spool.segments()] == ["e0", "e1", "e2"]
    assert os.path.commonpath([str(p) for p in spool.segments()]) == str(spool.dir)


def test_a_spool_folder_deleted_while_a_segment_is_open_gets_the_next_records(tmp_path) -> None:
    """A cache cleaner (or `rm -rf ~/.cache`) removes the folder while this process keeps a
    segment open: the next append must land in a new file there, not in the deleted one,
    where records counted as spooled would be lost at close."""
    import shutil

    spool = Spool(tmp_path / "spool", DEST, max_bytes=10**9)
    assert spool.append([row(i) for i in range(3)]) == 3
    shutil.rmtree(tmp_path / "spool")
    assert spool.append([row(i) for i in range(3, 7)]) == 4
    spool.seal()
    assert [r["event_id"] for r in all_records(spool)] == ["e3", "e4", "e5", "e6"]
    assert spool.size_bytes() == sum(len(encode(row(i))) for i in range(3, 7))


def test_appends_to_a_full_disk_leave_no_empty_segments(tmpfs) -> None:
    """Each append that fits nothing on a full disk started a segment: a long outage on
    a full disk left one empty file per batch (inodes, listings, replays of nothing)."""
    root = tmpfs(64 * 1024)
    spool = Spool(root, DEST, max_bytes=10**9)
    stored = 0
    for i in range(0, 200, 10):
        try:
            stored += spool.append([row(j, 2000) for j in range(i, i + 10)])
        except SpoolWriteError as exc:
            stored += exc.taken
    spool.seal()
    assert 0 < stored < 200
    assert [p.stat().st_size for p in spool.segments() if p.stat().st_size == 0] == []
    assert len(all_records(spool)) == stored
