"""Secrets planted through real runnables never reach the table, the spool or the dead letters.

The secrets (tests/planted.py) are fixed literals, and each check looks for those exact
strings: the product's own patterns are never the oracle. Values under secret-looking keys
(tool arguments, chain inputs and outputs, tool-call arguments, invocation params, metadata,
document metadata) are plain strings a pattern could not recognise, so only the key check
can remove them. The key check and the formats alone: tests/unit/test_redact_unit.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.spool import read_segment

from .conftest import create_table_with_required_user, wait_for
from .models import ScriptedChatModel
from .planted import KEYED, LEAKY_TEXT, PLANTED
from .proxy import FaultProxy

ROWS = 9  # sequence, prompt, model, parser, lambda; tool twice; retriever; failing lambda


class PlantedRetriever(BaseRetriever):
    """Returns one document whose metadata holds secrets under header-style keys."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        metadata = {
            "source": "wiki/onboarding",
            "privateKey": KEYED["document metadata privateKey"],
            "Ocp-Apim-Subscription-Key": KEYED["document metadata Ocp-Apim-Subscription-Key"],
        }
        return [Document(page_content="Onboarding: " + LEAKY_TEXT, metadata=metadata)]


@tool
def lookup(query: str, api_key: str) -> dict[str, str]:
    """Look a city's weather up with the caller's key."""
    return {"forecast": f"sunny in {query}", "accessToken": KEYED["tool output accessToken"]}


def plant(handler: BigQueryAuditHandler) -> None:
    """Run a chain, a tool and a retriever that carry every planted secret."""
    call = {"name": "lookup", "id": "call-1",
            "args": {"query": "Lisbon", "apiKey": KEYED["tool-call argument apiKey"]}}  # fmt: skip
    model = ScriptedChatModel(message=AIMessage("Done.\n" + LEAKY_TEXT, tool_calls=[call]))
    answer = RunnableLambda(
        lambda text: {"answer": text, "clientSecret": KEYED["chain output clientSecret"]}
    )
    chain = (
        ChatPromptTemplate.from_messages([("human", "{question}")])
        | model.bind(azureAdToken=KEYED["invocation param azureAdToken"])
        | StrOutputParser()
        | answer
    )
    metadata = {"X-Api-Key": KEYED["metadata X-Api-Key"], "Cookie": KEYED["metadata Cookie"]}
    config: Any = {"callbacks": [handler], "metadata": metadata}
    chain.invoke(
        {"question": LEAKY_TEXT, "password": KEYED["chain input password"],
         "Authorization": KEYED["chain input Authorization"]},
        config=config,
    )  # fmt: skip
    lookup.invoke({"query": "Lisbon", "api_key": KEYED["tool argument api_key"]}, config=config)
    # as an agent calls it: the output is a ToolMessage whose content is the dict as JSON text
    lookup.invoke({"type": "tool_call", "name": "lookup", "id": "call-2",
                   "args": {"query": "Porto", "api_key": KEYED["tool-call input api_key"]}},
                  config=config)  # fmt: skip
    PlantedRetriever().invoke("onboarding", config=config)
    with pytest.raises(ValueError):
        RunnableLambda(fail).invoke("connect", config=config)


def fail(_: str) -> None:
    raise ValueError("could not connect:\n" + LEAKY_TEXT)


def strings(value: Any) -> Iterator[str]:
    """Every string in a row read back (JSON columns parsed), at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, v in value.items():
            yield key
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def assert_absent(texts: list[str], where: str) -> None:
    assert texts
    for secret in PLANTED:
        found = [t[:300] for t in texts if secret in t]
        assert not found, f"{secret!r} in {where}: {found}"


def segment_texts(folder: Path) -> list[str]:
    """Each segment file's raw text, and every string of its records."""
    texts: list[str] = []
    for path in sorted(folder.rglob("*.seg")):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        for record in read_segment(path).records:
            texts += strings(record)
    return texts


MODES = ["full", "redacted", "metadata"]


@pytest.mark.parametrize("mode", MODES)
def test_planted_secrets_never_reach_the_table(make_handler, read_rows, mode: str) -> None:
    handler = make_handler(capture_mode=mode, capture_documents=True)
    plant(handler)
    assert handler.flush(timeout=60)
    rows = read_rows()
    assert len(rows) == ROWS
    assert_absent([t for row in rows for t in strings(row)], f"the table ({mode})")

    by_name = {(r["run_type"], r["name"]): r for r in rows}
    model = by_name["chat_model", "ScriptedChatModel"]
    assert model["invocation_params"]["azureAdToken"] == "<removed>"
    assert model["metadata"]["X-Api-Key"] == model["metadata"]["Cookie"] == "<removed>"
    tool_row, called_row = sorted((r for r in rows if r["run_type"] == "tool"),
                                  key=lambda r: r["start_time"])  # fmt: skip
    failed = by_name["chain", "fail"]
    assert failed["status"] == "error" and "password=[SECRET]" in failed["error_message"]
    if mode == "metadata":
        assert model["tool_calls"] == [{"name": "lookup", "id": "call-1"}]
        assert tool_row["input_text"] == tool_row["output_text"] == ""
        return
    args = model["tool_calls"][0]["args"]
    assert args == {"query": "Lisbon", "apiKey": "<removed>"}
    assert json.loads(tool_row["input_text"]) == {"query": "Lisbon", "api_key": "<removed>"}
    assert json.loads(tool_row["output_text"]) == {"forecast": "sunny in Lisbon",
                                                   "accessToken": "<removed>"}  # fmt: skip
    assert json.loads(called_row["input_text"]) == {"query": "Porto", "api_key": "<removed>"}
    assert json.loads(called_row["output_text"]) == {"forecast": "sunny in Porto",
                                                     "accessToken": "[SECRET]"}  # fmt: skip
    root = by_name["chain", "RunnableSequence"]
    question = json.loads(root["input_text"])
    assert (question["password"], question["Authorization"]) == ("<removed>", "<removed>")
    assert json.loads(root["output_text"])["clientSecret"] == "<removed>"
    (doc,) = by_name["retriever", "PlantedRetriever"]["output_messages"]
    assert doc["metadata"] == {"source": "wiki/onboarding", "privateKey": "<removed>",
                               "Ocp-Apim-Subscription-Key": "<removed>"}  # fmt: skip
    # What is around a credential stays: only the secret part goes.
    text = model["input_text"]
    for kept in ("postgres://deploy:[SECRET]@db.internal:5432/app", "password=[SECRET]",
                 "AccountName=acme;AccountKey=[SECRET];", "Authorization: Bearer [SECRET]",
                 "Basic [SECRET]", "Password=[SECRET];"):  # fmt: skip
        assert kept in text, kept


@pytest.mark.parametrize("mode", MODES)
def test_planted_secrets_never_reach_the_spool(tmp_path: Path, table_name: str, mode: str) -> None:
    unreachable = FaultProxy(1)  # BigQuery cannot be reached: every row is spooled
    unreachable.set_mode("reset")
    spool = tmp_path / "spool"
    # a table of its own: the process keeps one writer per table and endpoint, so a proxy
    # given the port an earlier mode's had would get that writer, spooling to its folder
    handler = BigQueryAuditHandler(
        table=table_name, emulator_host=unreachable.host_port, spool_dir=str(spool),
        batch_age_s=0.01, batch_deadline_s=0.2, capture_mode=mode, capture_documents=True,
    )  # fmt: skip
    try:
        plant(handler)
        wait_for(lambda: handler.stats()["spooled"] == ROWS, 60, "every row to be spooled")
    finally:
        handler.close(timeout=1)
        unreachable.close()
    texts = segment_texts(spool)
    assert sum(len(read_segment(p).records) for p in spool.rglob("*.seg")) == ROWS
    assert any("<removed>" in t for t in texts)
    assert_absent(texts, f"the spool ({mode})")


@pytest.mark.parametrize("mode", MODES)
def test_planted_secrets_never_reach_the_dead_letters(
    bq_client, table_name, tmp_path: Path, mode: str
) -> None:
    create_table_with_required_user(bq_client, table_name)  # rows without a user are rejected
    spool = tmp_path / "spool"
    handler = BigQueryAuditHandler(client=bq_client, table=table_name, spool_dir=str(spool),
                                   batch_age_s=0.05, capture_mode=mode,
                                   capture_documents=True)  # fmt: skip
    try:
        plant(handler)
        wait_for(lambda: handler.stats()["dead_lettered"] == ROWS, 60, "every row rejected")
        dead = handler._writer.spool.dead_letters()
    finally:
        handler.close(timeout=5)
    records = [r for path in dead for r in read_segment(path).records]
    assert len(records) == ROWS
    assert all("user_id" in r["error"] for r in records)
    assert_absent(segment_texts(spool), f"the dead letters ({mode})")


def planted_in(texts: list[str]) -> list[str]:
    return [s for s in PLANTED if any(s in t for t in texts)]


def test_the_checks_above_can_fail() -> None:
    """The scan sees the planted strings when they are there: a row as LangChain gave it,
    before the handler, holds every one."""
    raw = [LEAKY_TEXT, *KEYED.values()]
    assert planted_in(raw) == list(PLANTED)
    with pytest.raises(AssertionError):
        assert_absent(raw, "raw input")
