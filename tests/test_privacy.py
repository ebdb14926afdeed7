"""Privacy and tamper evidence on the real local BigQuery: capture modes, redactors,
pseudonymous users, secrets, and `bq-audit verify` against real DML edits."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.integrity import row_hash, verify

from .conftest import query, wait_for
from .proxy import FaultProxy

DATASET = "language_model_logging"
PII = {
    "email": "ana.lopez+audit@example.com",
    "phone": "+1 415-555-0132",
    "card": "4111 1111 1111 1111",
    "api_key": "sk-proj-0123456789abcdefghijABCDEFGH",
    "bearer": "Bearer eyZ0123456789abcdefghijklmnop",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "pem": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
    "-----END PRIVATE KEY-----",
}
NOT_A_CARD = "4111 1111 1111 1112"  # fails the Luhn check: kept


def parts(name: str) -> list[str]:
    """What of `PII[name]` must not be written: a private key's body line by line (the whole
    block, line breaks and all, is never in a JSON dump, whose line breaks are escaped)."""
    value = PII[name]
    return value.splitlines()[1:-1] if name == "pem" else [value]


PROMPT = ChatPromptTemplate.from_messages([("human", "{question}")])


def leaky_question() -> str:
    return (
        f"I am {PII['email']}, call {PII['phone']}. Card {PII['card']} (not {NOT_A_CARD}). "
        f"My key {PII['api_key']}, header {PII['bearer']}, aws {PII['aws']}.\n{PII['pem']}\n"
        "About Project Falcon."
    )


def run_leaky_chain(handler: BigQueryAuditHandler) -> None:
    call = {"name": "lookup", "args": {"email": PII["email"]}, "id": "c1"}
    answer = AIMessage(f"Mailing {PII['email']} about Project Falcon.", tool_calls=[call])
    chain = PROMPT | GenericFakeChatModel(messages=iter([answer])) | StrOutputParser()
    meta = {"user_id": "ana", "contact": PII["email"]}
    chain.invoke({"question": leaky_question()}, config={"callbacks": [handler], "metadata": meta})


def codename(text: str) -> str:
    return text.replace("Project Falcon", "[CODENAME]")


def test_redacted_mode_keeps_personal_data_and_secrets_out_of_every_column(
    make_handler, read_rows
) -> None:
    handler = make_handler(capture_mode="redacted", redactors=[codename])
    run_leaky_chain(handler)
    assert handler.flush(timeout=60)
    rows = read_rows()
    assert len(rows) == 4
    dump = json.dumps(rows, default=str)
    for name in PII:
        for part in parts(name):
            assert part not in dump, name
    assert "Project Falcon" not in dump
    (model_row,) = [r for r in rows if r["run_type"] == "chat_model"]
    text = model_row["input_text"]
    for marker in ("[EMAIL]", "[PHONE]", "[CARD]", "[SECRET]", "[CODENAME]"):
        assert marker in text, marker
    assert NOT_A_CARD in text
    assert model_row["output_text"] == "Mailing [EMAIL] about [CODENAME]."
    assert model_row["tool_calls"] == [{"name": "lookup", "args": {"email": "[EMAIL]"},
                                        "id": "c1"}]  # fmt: skip
    assert model_row["metadata"]["contact"] == "[EMAIL]"
    assert {r["capture_mode"] for r in rows} == {"redacted"}


def test_full_mode_keeps_text_but_never_credentials(make_handler, read_rows) -> None:
    handler = make_handler()
    run_leaky_chain(handler)
    assert handler.flush(timeout=60)
    dump = json.dumps(read_rows(), default=str)
    assert PII["email"] in dump and "Project Falcon" in dump  # full: the text as it came
    for name in ("api_key", "bearer", "aws", "pem"):
        for part in parts(name):
            assert part not in dump, name


def run_history_chain(handler: BigQueryAuditHandler, history: list[Any]) -> None:
    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{q}")])
    chain = prompt | FakeListChatModel(responses=["ok"]) | StrOutputParser()
    chain.invoke({"history": history, "q": "go on"}, config={"callbacks": [handler]})


@pytest.mark.parametrize("mode", ["full", "redacted"])
def test_credentials_after_a_line_break_are_removed_from_json_rendered_columns(
    make_handler, read_rows, mode: str
) -> None:
    """Messages become JSON (input_messages, a chain's input_text), where a line break is
    the two characters `\\n`: a credential right after one must still be found."""
    history = [HumanMessage("line one\n" + PII["api_key"] + "\tand\n" + PII["aws"]),
               AIMessage("noted\n" + PII["email"] + "\n" + PII["phone"])]  # fmt: skip
    handler = make_handler(capture_mode=mode)
    run_history_chain(handler, history)
    assert handler.flush(timeout=60)
    rows = read_rows()
    assert len(rows) == 4
    dump = json.dumps(rows, default=str)
    assert PII["api_key"] not in dump and PII["aws"] not in dump
    assert "[SECRET]" in dump
    (model_row,) = [r for r in rows if r["run_type"] == "chat_model"]
    contents = [m["content"] for m in model_row["input_messages"]]  # still valid JSON
    assert contents[0] == "line one\n[SECRET]\tand\n[SECRET]"
    if mode == "redacted":
        assert PII["email"] not in dump and PII["phone"] not in dump
        assert contents[1] == "noted\n[EMAIL]\n[PHONE]"
    else:
        assert contents[1] == history[1].content


def test_a_credential_across_the_length_limit_is_removed_whole(make_handler, read_rows) -> None:
    """Text is cut to `max_field_chars` after redaction: a key the cut would split (leaving
    a prefix too short to recognise) is removed before the cut."""
    handler = make_handler(max_field_chars=300)
    text = "x" * 281 + " " + PII["api_key"]  # "user: " + text: the cut keeps "sk-proj-0123"
    FakeListChatModel(responses=["ok"]).invoke(text, config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    (row,) = read_rows()
    assert row["is_truncated"] is True
    assert row["input_text"].startswith("user: " + "x" * 281)
    assert "sk-proj" not in json.dumps(row, default=str)


def test_no_unredacted_text_reaches_the_spool(tmp_path: Path) -> None:
    dead = FaultProxy(1)  # BigQuery unreachable: every row goes to the spool
    dead.set_mode("reset")
    spool = tmp_path / "spool"
    handler = BigQueryAuditHandler(
        table="spooled_private", emulator_host=dead.host_port, spool_dir=str(spool),
        batch_age_s=0.01, batch_deadline_s=0.2, capture_mode="redacted",
    )  # fmt: skip
    try:
        run_leaky_chain(handler)
        assert handler.flush(timeout=10) is False
        # spooled once the batch deadline ran out: maybe after the flush gave up, when loaded
        wait_for(lambda: handler.stats()["spooled"] == 4, 60, "the rows to be spooled")
    finally:
        handler.close(timeout=1)
        dead.close()
    on_disk = b"".join(p.read_bytes() for p in spool.rglob("*.seg")).decode()
    assert "[EMAIL]" in on_disk
    for name in PII:
        for part in parts(name):
            assert part not in on_disk, name


def test_metadata_mode_keeps_hashes_sizes_tokens_and_no_text(make_handler, read_rows,
                                                             bq_client) -> None:  # fmt: skip
    usage = {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}
    call = {"name": "lookup", "args": {"q": "secret plans"}, "id": "c9"}

    def model() -> Any:
        msg = AIMessage("the answer", usage_metadata=usage, tool_calls=[call])
        return GenericFakeChatModel(messages=iter([msg]))

    handler = make_handler(capture_mode="metadata")
    model().invoke("the question", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    (row,) = read_rows()
    assert (row["input_text"], row["output_text"]) == ("", "")
    assert row["input_sha256"] == hashlib.sha256(b"user: the question").hexdigest()
    assert row["output_sha256"] == hashlib.sha256(b"the answer").hexdigest()
    assert (row["input_chars"], row["output_chars"]) == (len("user: the question"), 10)
    assert row["input_messages"] is None and row["output_messages"] is None
    assert row["tool_calls"] == [{"name": "lookup", "id": "c9"}]
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (11, 7, 18)
    assert row["capture_mode"] == "metadata" and row["latency_ms"] >= 0
    assert "question" not in json.dumps(row, default=str)


def test_user_ids_are_pseudonymous_and_stable_across_processes(
    emulator, bq_client, table_name
) -> None:
    code = """
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_bq_audit import BigQueryAuditHandler
    handler = BigQueryAuditHandler()
    FakeListChatModel(responses=["x"]).invoke("q", config={"callbacks": [handler],
                                                           "metadata": {"user_id": "alice"}})
    assert handler.flush(timeout=60)
    """
    for key in ("key-one", "key-one", "key-two"):
        env = {**os.environ, "BIGQUERY_EMULATOR_HOST": emulator.host_port,
               "BQ_AUDIT_TABLE": table_name, "BQ_AUDIT_USER_ID_KEY": key}  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert key not in proc.stdout + proc.stderr
    users = [
        r["user_id"]
        for r in query(
            bq_client,
            f"SELECT user_id FROM `{bq_client.project}.{DATASET}.{table_name}` ORDER BY timestamp",
        )
    ]
    one = hmac.new(b"key-one", b"alice", hashlib.sha256).hexdigest()
    two = hmac.new(b"key-two", b"alice", hashlib.sha256).hexdigest()
    assert users == [one, one, two]


def verify_cli(emulator: Any, table: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", "verify", "--endpoint", emulator.host_port,
         "--table", table, *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_verify_names_deleted_and_edited_rows_by_chain_and_seq(
    emulator, bq_client, make_handler, table_name, read_rows
) -> None:
    handler = make_handler()
    chain = PROMPT | FakeListChatModel(responses=["a"])  # three rows a call
    for i in range(4):
        chain.invoke({"question": f"q{i}"}, config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    rows = read_rows()
    (chain_id,) = {r["chain_id"] for r in rows}
    assert sorted(r["seq"] for r in rows) == list(range(1, 13))

    clean = verify_cli(emulator, table_name)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert f"chain {chain_id}: 12 rows, ok" in clean.stdout

    full = f"{bq_client.project}.{DATASET}.{table_name}"
    replayed = json.loads(json.dumps({k: v for k, v in rows[2].items() if v is not None},
                                     default=str))  # fmt: skip
    assert bq_client.insert_rows_json(full, [replayed]) == []  # an exact copy, as a replay
    assert verify_cli(emulator, table_name).returncode == 0

    bq_client.query(f"DELETE FROM `{full}` WHERE seq = 3", job_retry=None).result()
    bq_client.query(f"UPDATE `{full}` SET output_text = 'tampered' WHERE seq = 6",
                    job_retry=None).result()  # fmt: skip
    found = verify_cli(emulator, table_name)
    assert found.returncode == 1, found.stdout
    assert f"chain {chain_id} seq 3: missing" in found.stdout
    assert f"chain {chain_id} seq 6: edited" in found.stdout
    assert "2 finding(s)" in found.stdout


def test_verify_since_checks_only_the_rows_from_that_date_on(
    emulator, bq_client, table_name
) -> None:
    """A chain whose first three rows are three days old: `--since` today leaves them (and
    the row deleted among them) out, and still finds the row deleted today."""
    from google.cloud import bigquery

    from langchain_bq_audit import schema
    from langchain_bq_audit.integrity import HashChain
    from langchain_bq_audit.rows import iso

    full = f"{bq_client.project}.{DATASET}.{table_name}"
    bq_client.create_dataset(f"{bq_client.project}.{DATASET}", exists_ok=True)
    bq_client.create_table(bigquery.Table(full, schema=schema.to_schema_fields()))
    today = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    chain = HashChain()
    rows = []
    for i in range(6):
        at = (today - dt.timedelta(days=3) if i < 3 else today) + dt.timedelta(seconds=i)
        row = {"timestamp": iso(at.timestamp()), "start_time": iso(at.timestamp()),
               "input_text": f"q{i}", "output_text": "a", "event_id": f"e{i}",
               "run_id": f"e{i}", "run_type": "llm", "status": "ok"}  # fmt: skip
        chain.link(row)
        rows.append(row)
    assert bq_client.insert_rows_json(full, rows) == []
    bq_client.query(f"DELETE FROM `{full}` WHERE seq IN (2, 5)", job_retry=None).result()

    everything = verify_cli(emulator, table_name)
    assert everything.returncode == 1, everything.stdout + everything.stderr
    assert f"chain {chain.chain_id}: 4 rows, 2 finding(s)" in everything.stdout
    assert f"chain {chain.chain_id} seq 2: missing" in everything.stdout
    assert f"chain {chain.chain_id} seq 5: missing" in everything.stdout

    window = verify_cli(emulator, table_name, "--since", today.date().isoformat())
    assert window.returncode == 1, window.stdout + window.stderr
    assert f"chain {chain.chain_id}: 2 rows, 1 finding(s)" in window.stdout
    assert f"chain {chain.chain_id} seq 5: missing" in window.stdout
    assert "seq 2" not in window.stdout and "seq 1" not in window.stdout


def test_verify_reports_two_different_rows_under_one_seq_as_conflicting_copies(
    emulator, bq_client, make_handler, table_name, read_rows
) -> None:
    handler = make_handler()
    for i in range(3):
        FakeListChatModel(responses=["a"]).invoke(f"q{i}", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    rows = read_rows()
    (chain_id,) = {r["chain_id"] for r in rows}
    second = next(r for r in rows if r["seq"] == 2)
    other = json.loads(json.dumps({k: v for k, v in second.items() if v is not None},
                                  default=str))  # fmt: skip
    other["output_text"] = "another answer"
    other["row_hash"] = row_hash(other, json_parsed=True)  # a valid row of its own
    assert bq_client.insert_rows_json(f"{bq_client.project}.{DATASET}.{table_name}", [other]) == []

    found = verify_cli(emulator, table_name)
    assert found.returncode == 1, found.stdout
    assert f"chain {chain_id} seq 2: conflict: 2 different rows share this seq" in found.stdout
    assert "edited" not in found.stdout  # each copy matches its own hash


def test_rewriting_a_hash_breaks_the_next_link(make_handler, read_rows) -> None:
    handler = make_handler()
    for i in range(3):
        FakeListChatModel(responses=["a"]).invoke(f"q{i}", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    rows = read_rows()
    assert verify(rows).ok
    forged = next(r for r in rows if r["seq"] == 2)
    forged["output_text"] = "forged"
    forged["row_hash"] = row_hash(forged, json_parsed=True)  # a careful forger
    report = verify(rows)
    assert [(f.seq, f.kind) for f in report.findings] == [(3, "broken_link")]
