"""Signed digests: each forgery a table editor can make against the unkeyed chain, made with
real DML on the local BigQuery by a forger who recomputes SHA-256 with the project's own
hashing, is named by `bq-audit verify --public-key`; the same forgery passes the unkeyed
check, which shows it is a faithful one. Signing and the canonical form get unit tests."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from langchain_core.language_models import FakeListChatModel

from langchain_bq_audit import BigQueryAuditHandler, schema
from langchain_bq_audit.digests import (
    Digester,
    canonical,
    check,
    generate_key,
    key_id,
    load_public_key,
    private_key_from_text,
    read_digest_file,
    sign,
    signature_ok,
)
from langchain_bq_audit.integrity import HashChain, row_hash

from .conftest import query, wait_for
from .test_privacy import verify_cli

DATASET = "language_model_logging"


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, Path]:
    """The application's key (private file) and the auditor's public key file."""
    kid, public = generate_key(tmp_path / "digest-key.pem")
    assert len(kid) == 16
    return tmp_path / "digest-key.pem", public


def write_signed(handler: BigQueryAuditHandler, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        FakeListChatModel(responses=[f"a{i}"]).invoke(f"q{i}", config={"callbacks": [handler]})


def rows_of(bq_client: Any, table: str) -> list[dict[str, Any]]:
    return query(
        bq_client, f"SELECT * FROM `{bq_client.project}.{DATASET}.{table}` ORDER BY chain_id, seq"
    )


def digests_of(bq_client: Any, table: str) -> list[dict[str, Any]]:
    return query(
        bq_client,
        f"SELECT * FROM `{bq_client.project}.{DATASET}.{table}_digests` "
        "ORDER BY chain_id, digest_seq",
    )


def signed_table(make_handler: Any, bq_client: Any, table: str, key: Path) -> list[dict]:
    """12 rows of one chain, digests at seq 5 and 10 and a closing one at 12."""
    handler = make_handler(digest_key_file=str(key), digest_every_rows=5, digest_every_s=3600)
    write_signed(handler, 12)
    assert handler.close(timeout=120)
    rows = rows_of(bq_client, table)
    assert [r["seq"] for r in rows] == list(range(1, 13))
    digests = digests_of(bq_client, table)
    assert [(d["first_seq"], d["last_seq"], d["closed"]) for d in digests] == [
        (1, 5, False), (6, 10, False), (11, 12, True),
    ]  # fmt: skip
    return rows


def rewrite(bq_client: Any, table: str, row: dict[str, Any], **changes: Any) -> str:
    """UPDATE one row as a careful forger does: change it, then recompute its row_hash."""
    row.update(changes)
    row["row_hash"] = row_hash(row, json_parsed=True)
    sets = ", ".join(f"{k} = @{k}" for k in [*changes, "row_hash"])
    query(bq_client, f"UPDATE `{bq_client.project}.{DATASET}.{table}` SET {sets} "
          "WHERE seq = @where_seq AND chain_id = @where_chain", **changes, row_hash=row["row_hash"],
          where_seq=row["seq"], where_chain=row["chain_id"])  # fmt: skip
    return str(row["row_hash"])


def verify(emulator: Any, table: str, public: Path | None, *extra: str) -> tuple[int, str]:
    args = ("--public-key", str(public)) if public else ()
    done = verify_cli(emulator, table, *args, *extra)
    return done.returncode, done.stdout + done.stderr


def assert_fools_unkeyed_but_not_signed(
    emulator: Any, table: str, public: Path, *named: str
) -> str:
    code, out = verify(emulator, table, None)
    assert code == 0 and "0 finding(s)" in out, out  # the unkeyed chain is fooled
    code, out = verify(emulator, table, public)
    assert code == 1, out
    for text in named:
        assert text in out, out
    return out


# -- each forgery, with a key the forger does not hold ---------------------------------------


def test_an_untouched_table_verifies_clean_and_says_what_it_cannot_prove(
    emulator, bq_client, make_handler, table_name, key
) -> None:
    rows = signed_table(make_handler, bq_client, table_name, key[0])
    chain = rows[0]["chain_id"]
    code, out = verify(emulator, table_name, key[1])
    assert code == 0, out
    assert f"chain {chain}: 12 rows, 3 signed digest(s), ok" in out
    assert "0 finding(s)" in out
    assert "what this cannot prove: rows written after a chain's last signed digest" in out
    code, out = verify(emulator, table_name, None)  # the old unkeyed check still reads it
    assert code == 0 and f"chain {chain}: 12 rows, ok" in out, out


def test_editing_the_last_row_and_rehashing_it_is_named(
    emulator, bq_client, make_handler, table_name, key
) -> None:
    rows = signed_table(make_handler, bq_client, table_name, key[0])
    rewrite(bq_client, table_name, rows[11], output_text="forged answer")
    chain = rows[0]["chain_id"]
    out = assert_fools_unkeyed_but_not_signed(
        emulator, table_name, key[1],
        f"chain {chain} seq 12: digest_mismatch: row_hash is not the one digest 3 signed",
    )  # fmt: skip
    assert "1 finding(s)" in out


def test_rewriting_a_suffix_and_relinking_it_is_named(
    emulator, bq_client, make_handler, table_name, key
) -> None:
    rows = signed_table(make_handler, bq_client, table_name, key[0])
    prev = rewrite(bq_client, table_name, rows[2], output_text="forged")  # seq 3
    for row in rows[3:]:  # seq 4-12 re-linked to the forged row
        prev = rewrite(bq_client, table_name, row, prev_hash=prev)
    chain = rows[0]["chain_id"]
    assert_fools_unkeyed_but_not_signed(
        emulator, table_name, key[1],
        f"chain {chain} seq 5: digest_mismatch", f"chain {chain} seq 10: digest_mismatch",
        f"chain {chain} seq 12: digest_mismatch", "3 finding(s)",
    )  # fmt: skip


def test_appending_a_forged_row_after_the_last_is_named(
    emulator, bq_client, make_handler, table_name, key
) -> None:
    rows = signed_table(make_handler, bq_client, table_name, key[0])
    forged = {**rows[11], "seq": 13, "event_id": "forged-13", "output_text": "forged",
              "prev_hash": rows[11]["row_hash"]}  # fmt: skip
    forged["row_hash"] = row_hash(forged, json_parsed=True)
    full = f"{bq_client.project}.{DATASET}.{table_name}"
    query(bq_client, f"INSERT INTO `{full}` SELECT * REPLACE (13 AS seq, @e AS event_id, "
          f"@o AS output_text, @p AS prev_hash, @h AS row_hash) FROM `{full}` WHERE seq = 12",
          e="forged-13", o="forged", p=forged["prev_hash"], h=forged["row_hash"])  # fmt: skip
    chain = rows[0]["chain_id"]
    assert_fools_unkeyed_but_not_signed(
        emulator, table_name, key[1],
        f"chain {chain} seq 13: appended: seq 13 come after the chain's closing digest 3",
        "1 finding(s)",
    )  # fmt: skip


def test_deleting_the_tail_older_than_one_digest_is_named(
    emulator, bq_client, make_handler, table_name, key
) -> None:
    rows = signed_table(make_handler, bq_client, table_name, key[0])
    query(bq_client, f"DELETE FROM `{bq_client.project}.{DATASET}.{table_name}` WHERE seq > 5")
    chain = rows[0]["chain_id"]
    assert_fools_unkeyed_but_not_signed(
        emulator, table_name, key[1],
        f"chain {chain} seq 6: tail_deleted: seq 6-12 not in the table, though digest 3 "
        "signed up to seq 12",
    )  # fmt: skip


def test_deleting_a_whole_chain_between_two_digests_is_named(
    emulator, bq_client, make_handler, table_name, key
) -> None:
    # two writers of one table (two clients): chain B's rows fall between chain A's digests
    a = make_handler(digest_key_file=str(key[0]), digest_every_rows=5, digest_every_s=3600)
    b = BigQueryAuditHandler(client=emulator.client(), table=table_name, batch_age_s=0.1,
                             digest_key_file=str(key[0]), digest_every_rows=5)  # fmt: skip
    write_signed(a, 5)
    write_signed(b, 7, first=100)
    write_signed(a, 5, first=5)
    assert b.close(timeout=120) and a.close(timeout=120)
    rows = rows_of(bq_client, table_name)
    (chain_b,) = {r["chain_id"] for r in rows if r["output_text"] == "a100"}
    assert len({r["chain_id"] for r in rows}) == 2
    query(bq_client, f"DELETE FROM `{bq_client.project}.{DATASET}.{table_name}` "
          "WHERE chain_id = @c", c=chain_b)  # fmt: skip
    assert_fools_unkeyed_but_not_signed(
        emulator, table_name, key[1],
        f"chain {chain_b} seq 1: chain_deleted: no row in the table, though 2 signed "
        "digest(s) cover seq 1-7 (the whole chain was deleted)",
    )  # fmt: skip


def test_a_forged_digest_is_named_and_proves_nothing(
    emulator, bq_client, make_handler, table_name, key, tmp_path
) -> None:
    rows = signed_table(make_handler, bq_client, table_name, key[0])
    chain = rows[0]["chain_id"]
    closing = digests_of(bq_client, table_name)[-1]
    rewrite(bq_client, table_name, rows[11], output_text="forged answer")
    # the forger signs digests that would cover the edit: with a key of his own, once under
    # the real key's id and once under his key's id
    own = Ed25519PrivateKey.generate()
    full = f"{bq_client.project}.{DATASET}.{table_name}_digests"
    for number, claimed in ((4, closing["key_id"]), (5, key_id(own.public_key()))):
        forged = {**closing, "digest_seq": number, "last_row_hash": rows[11]["row_hash"]}
        forged["signature"] = own.sign(canonical({**forged, "key_id": claimed})).hex()
        query(bq_client, f"INSERT INTO `{full}` SELECT * REPLACE (@n AS digest_seq, "
              "@h AS last_row_hash, @k AS key_id, @s AS signature, @e AS event_id) "
              f"FROM `{full}` WHERE digest_seq = 3", n=number, h=forged["last_row_hash"],
              k=claimed, s=forged["signature"], e=f"{chain}:{number}")  # fmt: skip
    assert_fools_unkeyed_but_not_signed(
        emulator, table_name, key[1],
        f"chain {chain} seq 12: forged_digest: digest 4 does not carry a valid signature",
        f"chain {chain} seq 12: unknown_key: digest 5 is signed by key",
        f"chain {chain} seq 12: digest_mismatch",
    )  # fmt: skip


def test_a_local_digest_file_still_names_a_chain_deleted_with_its_digests(
    emulator, bq_client, make_handler, table_name, key, tmp_path
) -> None:
    copy = tmp_path / "digests.jsonl"
    handler = make_handler(digest_key_file=str(key[0]), digest_every_rows=5, digest_file=str(copy))
    write_signed(handler, 7)
    assert handler.close(timeout=120)
    in_table = digests_of(bq_client, table_name)
    assert sorted(d["signature"] for d in read_digest_file(copy)) == sorted(
        d["signature"] for d in in_table
    )
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    for suffix in ("", "_digests"):  # someone who can edit both tables
        query(
            bq_client,
            f"DELETE FROM `{bq_client.project}.{DATASET}.{table_name}{suffix}` WHERE TRUE",
        )
    chain = in_table[0]["chain_id"]
    code, out = verify(emulator, table_name, key[1])
    assert code == 0 and "verified 0 rows" in out, out  # nothing left to see in BigQuery
    code, out = verify(emulator, table_name, key[1], "--digest-file", str(copy))
    assert code == 1 and f"chain {chain} seq 1: chain_deleted" in out, out


def test_rows_after_the_last_digest_are_reported_unproven_not_proven(
    emulator, bq_client, make_handler, table_name, key
) -> None:
    handler = make_handler(digest_key_file=str(key[0]), digest_every_rows=5, digest_every_s=3600)
    write_signed(handler, 7)
    assert handler.flush(timeout=60)  # not closed: seq 6-7 wait for the next digest
    wait_for(lambda: len(digests_of(bq_client, table_name)) == 1, 60, "the first digest")
    rows = rows_of(bq_client, table_name)
    rewrite(bq_client, table_name, rows[6], output_text="edited in the window")
    code, out = verify(emulator, table_name, key[1])
    assert code == 0, out  # an edit in the window cannot be shown...
    assert f"unproven: chain {rows[0]['chain_id']}: seq 6-7 were written after its last " in out
    handler.close(timeout=120)  # ...until the closing digest signs what the writer wrote
    code, out = verify(emulator, table_name, key[1])
    assert code == 1 and f"chain {rows[0]['chain_id']} seq 7: digest_mismatch" in out, out
    assert "unproven:" not in out


def test_a_digest_is_signed_every_digest_every_s_while_idle(
    bq_client, make_handler, table_name, key
) -> None:
    handler = make_handler(digest_key_file=str(key[0]), digest_every_rows=1000, digest_every_s=0.5)
    write_signed(handler, 2)
    assert handler.flush(timeout=60)

    def signed() -> bool:
        return [(d["first_seq"], d["last_seq"]) for d in digests_of(bq_client, table_name)] == [
            (1, 2)
        ]

    wait_for(signed, 60, "a timed digest of seq 1-2")


def test_the_writer_process_signs_with_a_key_from_the_environment(
    emulator, bq_client, table_name, key, monkeypatch
) -> None:
    monkeypatch.setenv("BQ_AUDIT_DIGEST_KEY", key[0].read_text())
    handler = BigQueryAuditHandler(
        table=table_name, emulator_host=emulator.endpoint, project=emulator.project,
        writer_process=True, digest_every_rows=3, batch_age_s=0.1,
    )  # fmt: skip
    assert "BEGIN" not in repr(handler.settings)  # the key is kept out of reprs
    write_signed(handler, 4)
    assert handler.flush(timeout=60)
    assert handler.stats()["writer_process"] is not None  # signed in the child
    assert handler.close(timeout=60)
    wait_for(lambda: len(digests_of(bq_client, table_name)) == 2, 60, "both digests")
    code, out = verify(emulator, table_name, key[1])
    assert code == 0 and "4 rows, 2 signed digest(s), ok" in out, out


def test_a_table_written_without_a_key_is_unsigned_for_a_keyed_verify(
    emulator, make_handler, table_name, key
) -> None:
    handler = make_handler()
    write_signed(handler, 2)
    assert handler.close(timeout=120)
    code, out = verify(emulator, table_name, key[1])
    assert code == 1 and "seq 1: unsigned: no valid signed digest covers this chain" in out
    assert "note: no table" in out, out


# -- keys, settings, CLI ---------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
    tmp_path: Path,
) -> None:
    path = tmp_path / "k.pem"
    cmd = [sys.executable, "-m", "langchain_bq_audit", "keygen", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public = load_public_key(tmp_path / "k.pem.pub")
    assert f"key id      {key_id(public)}" in done.stdout
    assert "BEGIN PRIVATE KEY" not in done.stdout  # the private key is never printed
    before = path.read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "never overwrites" in again.stderr
    assert path.read_bytes() == before


def test_bad_keys_and_settings_fail_at_construction(bq_client, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ValueError, match=f"digest_key_file {bad} is not an Ed25519"):
        BigQueryAuditHandler(client=bq_client, table="t_bad_key", digest_key_file=str(bad))
    with pytest.raises(ValueError, match="No such file"):
        BigQueryAuditHandler(client=bq_client, table="t_no_key",
                             digest_key_file=str(tmp_path / "missing.pem"))  # fmt: skip
    with pytest.raises(ValueError, match="not both"):
        BigQueryAuditHandler(table="t", digest_key="x", digest_key_file="y")
    with pytest.raises(ValueError, match="hash_chain"):
        BigQueryAuditHandler(table="t", digest_key="x", hash_chain=False)
    with pytest.raises(ValueError, match="digest_every_s must be positive"):
        BigQueryAuditHandler(table="t", digest_every_s=0)
    secret = Ed25519PrivateKey.generate()
    raw = secret.private_bytes_raw()
    import base64

    loaded = private_key_from_text(base64.b64encode(raw).decode())
    assert key_id(loaded.public_key()) == key_id(secret.public_key())
    with pytest.raises(ValueError) as err:
        private_key_from_text("c2VjcmV0LXRoYXQtaXMtbm90LWEta2V5")
    assert "c2VjcmV0" not in str(err.value)  # never echoes what was given


def test_init_creates_the_digests_table_from_schema_py(emulator, bq_client, table_name) -> None:
    # a busy emulator may take over init's default 30 s a request
    cmd = [sys.executable, "-m", "langchain_bq_audit", "init", "--endpoint", emulator.host_port,
           "--table", table_name, "--timeout", "120"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"table local.{DATASET}.{table_name}_digests: created" in done.stdout
    table = bq_client.get_table(f"{bq_client.project}.{DATASET}.{table_name}_digests")
    assert [(f.name, schema.normalize_type(f.field_type), f.mode) for f in table.schema] == [
        (c.name, c.type, c.mode) for c in schema.DIGEST_COLUMNS
    ]
    assert table.time_partitioning.field == "time"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert f"{table_name}_digests: up to date" in again.stdout


def test_readme_documents_the_digests_table_from_schema_py() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert schema.to_markdown(schema.DIGEST_COLUMNS, "digest column") in readme


# -- signing and the canonical form, without BigQuery ----------------------------------------

DIGEST = {
    "time": "2026-11-30T12:00:00.000001+00:00", "event_id": "c:2", "chain_id": "c",
    "digest_seq": 2, "first_seq": 6, "last_seq": 10, "row_count": 5,
    "last_row_hash": "ab" * 32, "closed": False, "prev_signature": "cd" * 64,
}  # fmt: skip


def test_canonical_form_is_the_domain_tag_and_sorted_fields_with_time_in_micros() -> None:
    assert canonical({**DIGEST, "key_id": "k"}) == (
        b'langchain-bq-audit digest v1\n{"chain_id":"c","closed":false,"digest_seq":2,'
        b'"first_seq":6,"key_id":"k","last_row_hash":"' + b"ab" * 32 + b'","last_seq":10,'
        b'"prev_signature":"' + b"cd" * 64 + b'","row_count":5,"time":1796040000000001}'
    )
    as_read = {**DIGEST, "time": dt.datetime(2026, 11, 30, 12, 0, 0, 1, tzinfo=dt.timezone.utc)}
    assert canonical(as_read) == canonical(DIGEST)  # BigQuery gives datetimes back
    assert canonical({**DIGEST, "event_id": "other"}) == canonical(DIGEST)  # not signed


@pytest.mark.parametrize(
    "field_name, value",
    [("chain_id", "d"), ("digest_seq", 3), ("first_seq", 5), ("last_seq", 11),
     ("row_count", 6), ("last_row_hash", "ef" * 32), ("closed", True),
     ("prev_signature", None), ("time", "2026-11-30T12:00:00.000002+00:00"),
     ("key_id", "0" * 16)],
)  # fmt: skip
def test_changing_any_signed_field_breaks_the_signature(field_name: str, value: Any) -> None:
    secret = Ed25519PrivateKey.generate()
    digest = sign(dict(DIGEST), secret)
    assert signature_ok(digest, secret.public_key())
    assert not signature_ok({**digest, field_name: value}, secret.public_key())
    assert not signature_ok(digest, Ed25519PrivateKey.generate().public_key())


def linked_rows(n: int) -> list[dict[str, Any]]:
    chain = HashChain()
    rows = []
    for i in range(n):
        row = {"timestamp": "2026-11-30T12:00:00+00:00", "event_id": f"e{i}",
               "input_text": f"q{i}", "output_text": "a"}  # fmt: skip
        chain.link(row)
        rows.append(row)
    return rows


def test_digester_signs_every_n_rows_links_digests_and_closes_once() -> None:
    secret = Ed25519PrivateKey.generate()
    emitted: list[dict[str, Any]] = []
    closed: list[float | None] = []
    digester = Digester(secret, 3, 3600, emitted.append, closed.append)
    rows = linked_rows(7)
    for row in rows[:3] + rows[4:2:-1] + rows[5:]:  # seq 4 and 5 seen out of order
        digester.observe(row)
    digester.close(5.0)
    digester.close(5.0)  # nothing new: no second closing digest
    assert [(d["first_seq"], d["last_seq"], d["row_count"], d["closed"]) for d in emitted] == [
        (1, 3, 3, False), (4, 6, 3, False), (7, 7, 1, True),
    ]  # fmt: skip
    assert [d["last_row_hash"] for d in emitted] == [rows[i]["row_hash"] for i in (2, 5, 6)]
    assert [d["prev_signature"] for d in emitted] == [None] + [d["signature"] for d in emitted[:2]]
    assert all(signature_ok(d, secret.public_key()) for d in emitted)
    assert closed == [5.0, 5.0]
    public = {key_id(secret.public_key()): secret.public_key()}
    report = check(rows, emitted, public)
    assert (report.findings, report.unproven, report.digests) == ([], [], {rows[0]["chain_id"]: 3})


def test_digester_timer_signs_what_waits_longer_than_every_s() -> None:
    secret = Ed25519PrivateKey.generate()
    emitted: list[dict[str, Any]] = []
    signed = threading.Event()
    digester = Digester(secret, 1000, 0.2, lambda d: (emitted.append(d), signed.set()))
    for row in linked_rows(2):
        digester.observe(row)
    assert signed.wait(60)
    assert [(d["first_seq"], d["last_seq"], d["closed"]) for d in emitted] == [(1, 2, False)]


def test_check_names_a_deleted_digest_between_two_kept_ones() -> None:
    secret = Ed25519PrivateKey.generate()
    emitted: list[dict[str, Any]] = []
    digester = Digester(secret, 2, 3600, emitted.append)
    rows = linked_rows(6)
    for row in rows:
        digester.observe(row)
    public = {key_id(secret.public_key()): secret.public_key()}
    report = check(rows, [emitted[0], emitted[2]], public)
    assert [(f.seq, f.kind) for f in report.findings] == [(5, "digest_missing")]
    assert "digest 2 not found" in report.findings[0].detail


def test_import_stays_free_of_cryptography() -> None:
    code = "import sys, langchain_bq_audit; print('cryptography' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ}, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "False", done.stderr


def test_a_digest_file_line_round_trips(tmp_path: Path) -> None:
    secret = Ed25519PrivateKey.generate()
    digest = sign(dict(DIGEST), secret)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(digest) + "\n" + '{"torn')
    (back,) = read_digest_file(path)
    assert signature_ok(back, secret.public_key())
