"""Attach everywhere: the environment, enable()/disable(), audit_context, many handlers, async,
several event loops, and a LangGraph agent. Every check reads the rows back from BigQuery."""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition

import langchain_bq_audit
from langchain_bq_audit import BigQueryAuditHandler, audit_context

from .conftest import query

PROMPT = ChatPromptTemplate.from_messages([("human", "{question}")])


@pytest.fixture(autouse=True)
def no_global_handler() -> Iterator[None]:
    yield
    langchain_bq_audit.disable()


def chain(answer: str = "ok") -> Any:
    return PROMPT | FakeListChatModel(responses=[answer]) | StrOutputParser()


def test_env_var_audits_every_run_of_a_process_without_callbacks(
    emulator, bq_client, table_name
) -> None:
    code = """
    import langchain_bq_audit  # registers the hook; nothing else is configured in code
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    chain = (ChatPromptTemplate.from_messages([("human", "{q}")])
             | FakeListChatModel(responses=["from env"]) | StrOutputParser())
    for i in range(3):
        chain.invoke({"q": f"question {i}"}, config={"metadata": {"user_id": f"u{i}"}})
    """  # rows are written by the exit drain: no flush, no handler in the code
    env = {
        **os.environ,
        "LANGCHAIN_BQ_AUDIT": "true",
        "BIGQUERY_EMULATOR_HOST": emulator.host_port,
        "BQ_AUDIT_TABLE": table_name,
        "BQ_AUDIT_APP_NAME": "env-app",
        # the first write creates the table and views: on a busy emulator that can take
        # longer than the default 5 s exit drain, and a spooled row is not read back here
        "BQ_AUDIT_SHUTDOWN_TIMEOUT_S": "60",
    }
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = query(
        bq_client,
        f"SELECT run_type, user_id, app_name, trace_id, run_id, parent_run_id, output_text "
        f"FROM `{bq_client.project}.language_model_logging.{table_name}`",
    )
    assert len(rows) == 3 * 4  # sequence, prompt, model, parser for each call
    roots = [r for r in rows if r["parent_run_id"] is None]
    assert sorted(r["user_id"] for r in roots) == ["u0", "u1", "u2"]
    assert {r["output_text"] for r in roots} == {"from env"}
    assert {r["app_name"] for r in rows} == {"env-app"}
    for root in roots:
        trace = [r for r in rows if r["trace_id"] == root["run_id"]]
        assert len(trace) == 4 and {r["user_id"] for r in trace} == {root["user_id"]}


def test_enable_disable_and_a_run_seen_twice_is_one_row(bq_client, table_name, read_rows) -> None:
    handler = langchain_bq_audit.enable(client=bq_client, table=table_name, batch_age_s=0.05)
    assert langchain_bq_audit.global_handler() is handler
    chain("global").invoke({"question": "q1"}, config={"metadata": {"user_id": "g"}})
    # the same table explicitly too, and the same handler passed twice: still one row a run
    explicit = BigQueryAuditHandler(client=bq_client, table=table_name, session_id="explicit")
    chain("both").invoke(
        {"question": "q2"}, config={"callbacks": [explicit, explicit], "metadata": {"user_id": "b"}}
    )
    langchain_bq_audit.disable()
    assert langchain_bq_audit.global_handler() is None
    chain("off").invoke({"question": "q3"})
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert len(rows) == 8 and len({r["event_id"] for r in rows}) == 8
    assert {r["user_id"] for r in rows} == {"g", "b"}
    # the explicit handler saw the runs of call 2 first (callbacks come before the hook's)
    assert {r["session_id"] for r in rows if r["user_id"] == "b"} == {"explicit"}
    stats = explicit.stats()
    assert stats["unmatched_ends"] == stats["callback_errors"] == 0
    assert handler.stats()["unmatched_ends"] == 0


def test_global_and_explicit_handlers_for_different_tables_both_write(
    bq_client, table_name, read_rows
) -> None:
    other = f"{table_name}_other"
    langchain_bq_audit.enable(client=bq_client, table=table_name, batch_age_s=0.05)
    explicit = BigQueryAuditHandler(client=bq_client, table=other, batch_age_s=0.05)
    chain().invoke({"question": "q"}, config={"callbacks": [explicit]})
    assert langchain_bq_audit.flush(timeout=60)
    assert len(read_rows()) == 4
    rows = query(
        bq_client, f"SELECT run_id FROM `{bq_client.project}.language_model_logging.{other}`"
    )
    assert len(rows) == 4


def test_audit_context_follows_threads_with_a_copied_context_and_asyncio_tasks(
    make_handler, read_rows
) -> None:
    handler = make_handler()
    model = FakeListChatModel(responses=["x"])

    def call(tag: str, **meta: Any) -> None:
        model.invoke(tag, config={"callbacks": [handler], "metadata": {"call": tag, **meta}})

    async def acall(tag: str) -> None:
        await model.ainvoke(tag, config={"callbacks": [handler], "metadata": {"call": tag}})

    async def tasks() -> None:
        await asyncio.gather(*(asyncio.create_task(acall(f"task-{i}")) for i in range(3)))

    with audit_context(session_id="s-ctx", user_id="u-ctx", tags=["ctx"], metadata={"k": "v"}):
        call("plain")
        call("own-metadata-wins", user_id="u-meta")
        with audit_context(user_id="u-inner", tags=["inner"]):
            call("nested")
        ctx = contextvars.copy_context()
        worker = threading.Thread(target=ctx.run, args=(call, "thread-copied"))
        worker.start()
        worker.join()
        bare = threading.Thread(target=call, args=("thread-bare",))  # a fresh context
        bare.start()
        bare.join()
        asyncio.run(tasks())
    call("after")
    assert handler.flush(timeout=60)

    rows = {r["input_text"].removeprefix("user: "): r for r in read_rows()}
    expect = {
        "plain": ("s-ctx", "u-ctx", ["ctx"]),
        "own-metadata-wins": ("s-ctx", "u-meta", ["ctx"]),
        "nested": ("s-ctx", "u-inner", ["ctx", "inner"]),
        "thread-copied": ("s-ctx", "u-ctx", ["ctx"]),
        "thread-bare": (None, None, []),
        "task-0": ("s-ctx", "u-ctx", ["ctx"]),
        "task-2": ("s-ctx", "u-ctx", ["ctx"]),
        "after": (None, None, []),
    }
    for tag, (session, user, tags) in expect.items():
        row = rows[tag]
        assert (row["session_id"], row["user_id"], row["tags"]) == (session, user, tags), tag
    assert (rows["plain"]["metadata"]["k"], rows["plain"]["metadata"]["call"]) == ("v", "plain")
    assert "k" not in rows["after"]["metadata"]


def test_ten_thousand_handlers_for_one_table_share_one_writer(
    bq_client, table_name, read_rows
) -> None:
    # the threads alive before, not their number: threads earlier tests of this process
    # left (a views thread waiting on its request, a writer's thread still stopping) may end
    # meanwhile
    before = set(threading.enumerate())
    started = time.perf_counter()
    handlers = [BigQueryAuditHandler(client=bq_client, table=table_name) for _ in range(10_000)]
    per_handler_us = (time.perf_counter() - started) / 10_000 * 1e6
    print(f"\nBigQueryAuditHandler(): {per_handler_us:.1f} us each")
    new = sorted(t.name for t in threading.enumerate() if t not in before)
    # one builder and one sender, in all
    assert new == [f"bq-audit-build:{table_name}", f"bq-audit-send:{table_name}"], new
    assert len({id(h._writer) for h in handlers}) == 1
    model = FakeListChatModel(responses=["x"])
    for i, h in enumerate(handlers[::1000]):
        model.invoke(str(i), config={"callbacks": [h]})
    assert handlers[0].flush(timeout=60)
    assert len(read_rows()) == 10


class _Noop(BaseCallbackHandler):
    run_inline = True


async def _worst_stall(work: Any) -> tuple[Any, float]:
    """Run `work` while a ticker measures the longest the loop went without running it."""
    done = asyncio.Event()
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0)
            worst = max(worst, time.perf_counter() - before)

    tick = asyncio.create_task(ticker())
    try:
        result = await work
    finally:
        done.set()
        await tick
    return result, worst


async def _run_method(method: str, callbacks: list[Any], n: int) -> list[str]:
    model = FakeListChatModel(responses=["answer"])
    chain = PROMPT | model | StrOutputParser()

    def cfg(i: int) -> dict[str, Any]:
        return {"callbacks": callbacks, "metadata": {"user_id": f"u{i}"}}

    async def one(i: int) -> str:
        q = {"question": f"q{i}"}
        if method == "ainvoke":
            return str(await chain.ainvoke(q, config=cfg(i)))
        if method == "astream":
            return "".join([c async for c in chain.astream(q, config=cfg(i))])
        events = [
            e async for e in chain.astream_events(q, config=cfg(i), version="v2")
            if e["event"] == "on_chain_end" and not e["parent_ids"]
        ]  # fmt: skip
        return str(events[0]["data"]["output"])

    if method == "abatch":
        qs = [{"question": f"q{i}"} for i in range(n)]
        configs = [cfg(i) for i in range(n)]
        out = await chain.abatch(qs, config=configs, max_concurrency=n)  # type: ignore[arg-type]
        return [str(o) for o in out]
    return list(await asyncio.gather(*(asyncio.create_task(one(i)) for i in range(n))))


@pytest.mark.parametrize("method", ["ainvoke", "astream", "astream_events", "abatch"])
def test_a_thousand_concurrent_async_calls_give_correct_rows_and_never_block_the_loop(
    method, make_handler, read_rows
) -> None:
    handler = make_handler(batch_rows=500)
    n = 1000
    noop_out, noop_stall = asyncio.run(_worst_stall(_run_method(method, [_Noop()], n)))
    out, stall = asyncio.run(_worst_stall(_run_method(method, [handler], n)))
    print(f"\n{method}: worst loop stall {stall * 1000:.1f} ms with the audit handler, "
          f"{noop_stall * 1000:.1f} ms with a no-op handler")  # fmt: skip
    assert out == noop_out == ["answer"] * n
    # a blocking call would stall for a request timeout (10 s); LangChain's own work for
    # 1,000 tasks is in both figures, and a busy neighbour can stretch either
    assert stall < max(2.0, 5 * noop_stall)
    assert handler.flush(timeout=60)

    rows = read_rows("parent_run_id IS NULL")
    assert len(rows) == n
    assert sorted(r["user_id"] for r in rows) == sorted(f"u{i}" for i in range(n))
    assert all(r["output_text"] == "answer" and r["status"] == "ok" for r in rows)
    assert {r["input_text"] for r in rows} == {f"q{i}" for i in range(n)}
    stats = handler.stats()
    assert stats["written"] == 4 * n and stats["pending_runs"] == 0
    assert stats["callback_errors"] == stats["unmatched_ends"] == 0


def test_several_loops_threads_with_their_own_loops_and_sync_calling_async(
    make_handler, read_rows
) -> None:
    handler = make_handler()
    model = FakeListChatModel(responses=["x"])

    async def acall(tag: str) -> str:
        out = await model.ainvoke(tag, config={"callbacks": [handler]})
        return str(out.content)

    for i in range(3):  # asyncio.run again and again: a new loop each time
        assert asyncio.run(acall(f"run-{i}")) == "x"

    with ThreadPoolExecutor(4) as pool:  # threads, each with a loop of its own
        assert list(pool.map(lambda i: asyncio.run(acall(f"thread-{i}")), range(4))) == ["x"] * 4

    # sync code calling async code: a sync invoke whose step runs an event loop of its own
    bridge = RunnableLambda(lambda q: asyncio.run(acall(f"inner-{q}")))
    finished = threading.Event()

    def sync_invoke() -> None:
        assert bridge.invoke("sync", config={"callbacks": [handler]}) == "x"
        finished.set()

    worker = threading.Thread(target=sync_invoke, daemon=True)
    worker.start()
    assert finished.wait(60), "a sync .invoke() hung"

    async def sync_inside_a_loop() -> str:  # a blocking invoke from async code still ends
        return str(model.invoke("in-loop", config={"callbacks": [handler]}).content)

    assert asyncio.run(sync_inside_a_loop()) == "x"
    assert handler.flush(timeout=60)

    rows = read_rows("run_type = 'chat_model'")
    expected = [f"run-{i}" for i in range(3)] + [f"thread-{i}" for i in range(4)]
    expected += ["inner-sync", "in-loop"]
    assert sorted(r["input_text"].removeprefix("user: ") for r in rows) == sorted(expected)
    (bridge_row,) = read_rows("run_type = 'chain'")
    assert bridge_row["input_text"] == "sync" and bridge_row["output_text"] == "x"
    assert handler.stats()["callback_errors"] == 0


# -- LangGraph --------------------------------------------------------------------------------


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _agent_graph(model: Any) -> Any:
    def agent(state: State) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode([add]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    graph.add_edge("tools", "agent")
    return graph.compile(checkpointer=InMemorySaver())


def test_langgraph_agent_with_a_tool_and_a_checkpointer(make_handler, read_rows) -> None:
    handler = make_handler()
    call = {"name": "add", "args": {"a": 2, "b": 3}, "id": "call-1"}
    model = GenericFakeChatModel(
        messages=iter(
            [AIMessage(content="", tool_calls=[call]), AIMessage("2 + 3 = 5"), AIMessage("bye")]
        )
    )
    app = _agent_graph(model)
    config: Any = {"callbacks": [handler], "configurable": {"thread_id": "thread-42"},
                   "metadata": {"user_id": "u-graph"}}  # fmt: skip
    first = app.invoke({"messages": [HumanMessage("What is 2 + 3?")]}, config=config)
    assert first["messages"][-1].content == "2 + 3 = 5"
    second = app.invoke({"messages": [HumanMessage("Thanks")]}, config=config)
    assert second["messages"][-1].content == "bye"
    assert len(second["messages"]) == 6  # the checkpointer kept the first turn
    assert handler.flush(timeout=60)

    rows = read_rows()
    assert {r["session_id"] for r in rows} == {"thread-42"}
    assert {r["user_id"] for r in rows} == {"u-graph"}
    roots = [r for r in rows if r["parent_run_id"] is None]
    assert [r["name"] for r in roots] == ["LangGraph", "LangGraph"]
    by_id = {r["run_id"]: r for r in rows}
    for row in rows:  # every parent is a row of the same trace; every trace has one root
        if row["parent_run_id"] is not None:
            parent = by_id[row["parent_run_id"]]
            assert parent["trace_id"] == row["trace_id"]
        assert by_id[row["trace_id"]]["parent_run_id"] is None
    turn1 = [r for r in rows if r["trace_id"] == roots[0]["run_id"]]
    names = sorted((r["run_type"], r["name"]) for r in turn1)
    assert names.count(("chain", "agent")) == 2 and names.count(("chain", "tools")) == 1
    first_call, second_call = [r for r in turn1 if r["run_type"] == "chat_model"]  # by start
    assert first_call["tool_calls"] == [call] and second_call["output_text"] == "2 + 3 = 5"
    (tool_row,) = [r for r in turn1 if r["run_type"] == "tool"]
    assert tool_row["name"] == "add" and tool_row["output_text"].endswith("5")
    assert by_id[tool_row["parent_run_id"]]["name"] == "tools"
    model_rows = [r for r in rows if r["run_type"] == "chat_model"]
    assert len(model_rows) == 3
    assert all(by_id[r["parent_run_id"]]["name"] == "agent" for r in model_rows)
    assert uuid.UUID(roots[1]["run_id"]) != uuid.UUID(roots[0]["run_id"])


# An application that knows nothing of the audit log: it calls a chain, and a process it
# starts the way uvicorn and gunicorn start workers (multiprocessing "spawn") calls it too.
UNMODIFIED_APP = """
import multiprocessing, sys
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

def call(who):
    chain = (ChatPromptTemplate.from_messages([("human", "{q}")])
             | FakeListChatModel(responses=[f"answer for {who}"]) | StrOutputParser())
    chain.invoke({"q": "hi"}, config={"metadata": {"user_id": who}})
    chain.invoke({"q": "not me"}, config={"callbacks": [], "metadata": {"user_id": who}})

if __name__ == "__main__":
    call("parent")
    worker = multiprocessing.get_context("spawn").Process(target=call, args=("worker",))
    worker.start()
    worker.join()
    print("audit loaded:", "langchain_bq_audit" in sys.modules)
"""


def run_app(tmp_path: Any, argv: list[str], env: dict[str, str]) -> str:
    app = tmp_path / "app.py"
    app.write_text(UNMODIFIED_APP)
    # a generous exit drain: this machine may be busy, and a row spooled is not read back
    env = {**os.environ, "BQ_AUDIT_SHUTDOWN_TIMEOUT_S": "60", **env}
    proc = subprocess.run([*argv, str(app)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def roots_by_user(bq_client: Any, table_name: str) -> dict[str, list[str]]:
    table = f"{bq_client.project}.language_model_logging.{table_name}"
    rows = query(bq_client, f"SELECT user_id, parent_run_id, output_text, trace_id "
                            f"FROM `{table}`")  # fmt: skip
    out: dict[str, list[str]] = {}
    for row in rows:
        if row["parent_run_id"] is None:
            out.setdefault(row["user_id"], []).append(row["output_text"])
    assert len(rows) == 4 * len(out), rows  # each call: sequence, prompt, model, parser
    return out


def test_launcher_audits_an_unmodified_app_and_the_processes_it_starts(
    emulator, bq_client, table_name, tmp_path
) -> None:
    # the app's own sitecustomize still runs (the launcher's chains to it)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_RAN'] = 'yes'\n")
    code = "import os; print('theirs ran:', os.environ.get('THEIRS_RAN'))"
    (tmp_path / "check.py").write_text(code)
    bq_audit = [sys.executable, "-m", "langchain_bq_audit", "run", "--table", table_name, "--"]
    env = {"BIGQUERY_EMULATOR_HOST": emulator.host_port, "PYTHONPATH": str(theirs),
           "LANGCHAIN_BQ_AUDIT": ""}  # fmt: skip
    argv = [*bq_audit, sys.executable, str(tmp_path / "check.py")]
    out = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.stdout.strip() == "theirs ran: yes", out.stderr

    stdout = run_app(tmp_path, [*bq_audit, sys.executable], env)
    assert "audit loaded: True" in stdout
    # rows are written by each process's exit drain; `callbacks=[]` calls are left out
    assert roots_by_user(bq_client, table_name) == {
        "parent": ["answer for parent"], "worker": ["answer for worker"]
    }  # fmt: skip


def test_install_hook_makes_the_variable_alone_audit_a_whole_virtualenv(
    emulator, bq_client, table_name, tmp_path
) -> None:
    import site
    import sysconfig

    # a fresh virtualenv that sees this one's packages, like an app's own environment
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_dir = subprocess.run([python, "-c", where], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    ours = sysconfig.get_paths()["purelib"]
    assert ours in site.getsitepackages()
    (Path(site_dir) / "_base_env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")

    hook = [python, "-m", "langchain_bq_audit", "install-hook"]
    installed = subprocess.run(hook, capture_output=True, text=True, check=True)
    assert "langchain_bq_audit_hook.pth" in installed.stdout
    env = {"BIGQUERY_EMULATOR_HOST": emulator.host_port, "BQ_AUDIT_TABLE": table_name}

    # unset: the hook loads nothing, and nothing is written
    assert "audit loaded: False" in run_app(tmp_path, [python], {**env, "LANGCHAIN_BQ_AUDIT": ""})
    stdout = run_app(tmp_path, [python], {**env, "LANGCHAIN_BQ_AUDIT": "true"})
    assert "audit loaded: True" in stdout
    assert roots_by_user(bq_client, table_name) == {
        "parent": ["answer for parent"], "worker": ["answer for worker"]
    }  # fmt: skip

    removed = subprocess.run([python, "-m", "langchain_bq_audit", "uninstall-hook"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert "removed" in removed.stdout
    assert not (Path(site_dir) / "langchain_bq_audit_hook.pth").exists()
