"""Host invariance: with the audit handler attached, every other handler and LangChain's own
streaming tracers see exactly the events they see without it.

A recording handler that is not `run_inline` (like LangChain's `astream_events` and
`astream_log` tracers) runs each workload twice, once alone and once next to the audit
handler; the events it receives, `astream_events`' events and `astream_log`'s runs must be
identical. Each workload also checks that the audit handler did write its rows.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate

from langchain_bq_audit import BigQueryAuditHandler

from .conftest import wait_for

pytestmark = pytest.mark.filterwarnings("ignore:astream_log is deprecated")

EVENTS = (
    "on_llm_start", "on_chat_model_start", "on_llm_new_token", "on_llm_end", "on_llm_error",
    "on_chain_start", "on_chain_end", "on_chain_error", "on_tool_start", "on_tool_end",
    "on_tool_error", "on_retriever_start", "on_retriever_end", "on_retriever_error",
)  # fmt: skip


class Recorder(BaseCallbackHandler):
    """Records every callback as (event, path of run names from the root); not inline."""

    def __init__(self) -> None:
        self.paths: dict[UUID, tuple[str, ...]] = {}
        self.events: Counter[tuple[str, tuple[str, ...]]] = Counter()

    def _record(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        run_id = kwargs["run_id"]
        if event.endswith("_start"):
            serialized = args[0] or {}
            name = kwargs.get("name") or serialized.get("name") or "?"
            parent = kwargs.get("parent_run_id")
            base = self.paths.get(parent, ("<lost parent>",)) if parent else ()
            self.paths[run_id] = (*base, name)
        self.events[(event, self.paths.get(run_id, ("<start never seen>",)))] += 1


def _recording(event: str) -> Callable[..., None]:
    def method(self: Recorder, *args: Any, **kwargs: Any) -> None:
        self._record(event, args, kwargs)

    return method


for _event in EVENTS:
    setattr(Recorder, _event, _recording(_event))


def llm_chain() -> Any:
    return (
        PromptTemplate.from_template("say {q}")
        | FakeListLLM(responses=["a b"])
        | (StrOutputParser())
    )


def chat_chain() -> Any:
    prompt = ChatPromptTemplate.from_messages([("human", "say {q}")])
    return prompt | FakeListChatModel(responses=["a b"]) | StrOutputParser()


def run_sync(chain: Any, mode: str, callbacks: list[Any]) -> Any:
    cfg: Any = {"callbacks": callbacks}
    if mode == "invoke":
        return chain.invoke({"q": "x"}, config=cfg)
    if mode == "batch":
        return chain.batch([{"q": "x"}, {"q": "y"}], config=cfg)
    return list(chain.stream({"q": "x"}, config=cfg))


async def run_async(chain: Any, mode: str, callbacks: list[Any]) -> Any:
    cfg: Any = {"callbacks": callbacks}
    if mode == "ainvoke":
        return await chain.ainvoke({"q": "x"}, config=cfg)
    if mode == "abatch":
        return await chain.abatch([{"q": "x"}, {"q": "y"}], config=cfg)
    if mode == "astream":
        return [c async for c in chain.astream({"q": "x"}, config=cfg)]
    if mode == "astream_events":
        events = [e async for e in chain.astream_events({"q": "x"}, config=cfg, version="v2")]
        return [(e["event"], e["name"], len(e["parent_ids"])) for e in events]
    # astream_log: the runs it reports, by name, and the final output
    state = None
    async for patch in chain.astream_log({"q": "x"}, config=cfg):
        state = patch if state is None else state + patch
    assert state is not None
    return sorted(state.state["logs"]), state.state["final_output"]


ROWS = {"invoke": 4, "batch": 8, "stream": 4, "ainvoke": 4, "abatch": 8, "astream": 4,
        "astream_events": 4, "astream_log": 4}  # fmt: skip


def observe(chain_factory: Callable[[], Any], mode: str, audit: list[Any]) -> tuple[Any, Any]:
    """(what the recorder saw, what the call returned), with `audit` handlers attached too."""
    recorder = Recorder()
    if mode in ("invoke", "batch", "stream"):
        out = run_sync(chain_factory(), mode, [recorder, *audit])
    else:
        out = asyncio.run(run_async(chain_factory(), mode, [recorder, *audit]))
    return recorder.events, out


@pytest.mark.parametrize("kind", ["llm", "chat_model"])
@pytest.mark.parametrize("mode", list(ROWS))
def test_other_handlers_and_tracers_see_the_same_events_with_the_handler_attached(
    kind: str, mode: str, make_handler: Callable[..., BigQueryAuditHandler], read_rows: Any
) -> None:
    factory = llm_chain if kind == "llm" else chat_chain
    alone, out_alone = observe(factory, mode, [])
    handler = make_handler()
    together, out_together = observe(factory, mode, [handler])

    assert sum(alone.values()) > 0
    assert together == alone
    assert out_together == out_alone
    # and the audit handler did its own job: one row per run, none unmatched
    assert handler.flush(timeout=60)
    wait_for(lambda: len(read_rows()) == ROWS[mode], 60, f"{ROWS[mode]} rows")
    assert {r["run_type"] for r in read_rows()} == {"chain", kind}
    stats = handler.stats()
    assert stats["unmatched_ends"] == stats["callback_errors"] == stats["pending_runs"] == 0


class InlineRecorder(Recorder):
    """Like LangSmith's `LangChainTracer`: called inline."""

    run_inline = True


def test_next_to_an_inline_tracer_async_llm_calls_still_give_rows(
    make_handler: Callable[..., BigQueryAuditHandler], read_rows: Any
) -> None:
    # langchain-core hides those starts from the non-inline recorder whatever we do; the
    # inline one and the audit handler get them, and nobody sees less than without us
    def observe_with(audit: list[Any]) -> tuple[Any, Any]:
        inline, other = InlineRecorder(), Recorder()
        asyncio.run(llm_chain().ainvoke({"q": "x"}, config={"callbacks": [inline, other, *audit]}))
        return inline.events, other.events

    alone = observe_with([])
    handler = make_handler()
    assert observe_with([handler]) == alone
    assert ("on_llm_start", ("RunnableSequence", "FakeListLLM")) in alone[0]
    assert handler.flush(timeout=60)
    wait_for(lambda: len(read_rows()) == 4, 60, "4 rows")
    assert sorted(r["run_type"] for r in read_rows()) == ["chain", "chain", "chain", "llm"]
    assert handler.stats()["unmatched_ends"] == 0
