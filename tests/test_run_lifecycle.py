"""Runs whose end never comes still leave a row: cut off by a timeout, under a run that
failed, in flight at close, at exit or at SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from langchain_bq_audit import BigQueryAuditHandler

from .conftest import accounted, query, wait_for


def slow_chain(seconds: float) -> object:
    prompt = ChatPromptTemplate.from_messages([("human", "{q}")])
    return prompt | FakeListChatModel(responses=["late"], sleep=seconds) | StrOutputParser()


def model_started(handler: BigQueryAuditHandler) -> bool:
    """In `slow_chain`: the prompt step has ended and the model call is under way (two
    pending runs alone could be the chain and its prompt step, on a slow machine)."""
    stats = handler.stats()
    return stats["accepted"] >= 1 and stats["pending_runs"] == 2


def test_a_model_call_cut_off_by_wait_for_leaves_a_cancelled_row(make_handler, read_rows) -> None:
    handler = make_handler()
    chain = slow_chain(2.0)

    async def main() -> None:
        # as `asyncio.wait_for(chain.ainvoke(...), t)` with t once the model has started
        # (a fixed t could, on a loaded machine, cut the chain before the model starts)
        call = asyncio.ensure_future(chain.ainvoke({"q": "hi"}, config={"callbacks": [handler]}))  # type: ignore[attr-defined]
        while not model_started(handler):
            await asyncio.sleep(0.01)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call, 0.05)

    asyncio.run(main())
    assert handler.flush(60)  # no need to wait for run_ttl_s (1 h)
    rows = {r["run_type"] + ":" + r["name"]: r for r in read_rows()}
    assert rows["chain:RunnableSequence"]["status"] == "cancelled"
    model = rows["chat_model:FakeListChatModel"]
    assert model["status"] == "cancelled" and model["error_type"] == "RunNotEnded"
    assert rows["chain:RunnableSequence"]["run_id"] in model["error_message"]
    assert model["trace_id"] == rows["chain:RunnableSequence"]["run_id"]
    stats = accounted(handler)
    assert stats["pending_runs"] == 0 and stats["written"] == 3


def test_runs_under_a_failed_run_are_closed_with_it(make_handler, read_rows) -> None:
    """A step that times out its own model call, then fails: the model's end never comes."""
    handler = make_handler()
    model = FakeListChatModel(responses=["late"], sleep=3.0)

    async def lookup(question: str) -> str:
        answer = await asyncio.wait_for(model.ainvoke(question), 0.2)  # raises TimeoutError
        return str(answer.content)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(RunnableLambda(lookup).ainvoke("q", config={"callbacks": [handler]}))
    assert handler.flush(60)
    rows = {r["run_type"]: r for r in read_rows()}
    assert rows["chain"]["status"] == "error" and rows["chain"]["error_type"] == "TimeoutError"
    assert rows["chat_model"]["status"] == "cancelled"
    assert rows["chat_model"]["error_type"] == "RunNotEnded"
    assert rows["chat_model"]["parent_run_id"] == rows["chain"]["run_id"]
    stats = accounted(handler)
    assert stats["pending_runs"] == 0 and stats["written"] == 2


def test_runs_in_flight_at_close_are_written_as_abandoned(make_handler, read_rows) -> None:
    handler = make_handler()
    chain = slow_chain(5.0)
    worker = threading.Thread(
        target=lambda: chain.invoke({"q": "hi"}, config={"callbacks": [handler]}),  # type: ignore[attr-defined]
        daemon=True,
    )
    worker.start()
    wait_for(lambda: model_started(handler), 60, "the model call to start")
    assert handler.close(timeout=60)
    rows = read_rows("status = 'abandoned'")
    assert sorted(r["run_type"] for r in rows) == ["chain", "chat_model"]
    assert all(r["error_message"] == "still running when the audit writer closed" for r in rows)
    assert handler.stats()["abandoned"] == 2
    worker.join(30)


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_runs_in_flight_at_exit_or_sigterm_leave_a_row(
    emulator, bq_client, table_name, how
) -> None:
    script = textwrap.dedent(f"""
        import os, signal, threading, time
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_bq_audit import BigQueryAuditHandler
        handler = BigQueryAuditHandler(table={table_name!r}, shutdown_timeout_s=60)
        model = FakeListChatModel(responses=["never"], sleep=120)
        threading.Thread(target=lambda: model.invoke("q", config={{"callbacks": [handler]}}),
                         daemon=True).start()
        while handler.stats()["pending_runs"] == 0:
            time.sleep(0.05)
        print("in-flight", flush=True)
        if {how!r} == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(120)
    """)
    env = {**os.environ, "BIGQUERY_EMULATOR_HOST": emulator.host_port}
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=180)  # fmt: skip
    assert "in-flight" in child.stdout, child.stderr
    expected = -signal.SIGTERM if how == "sigterm" else 0
    assert child.returncode == expected, child.stderr
    table = f"{bq_client.project}.language_model_logging.{table_name}"
    rows = query(bq_client, f"SELECT run_type, status FROM `{table}`")
    assert rows == [{"run_type": "chat_model", "status": "abandoned"}]
