"""OpenTelemetry span ids and LangGraph node columns without BigQuery: the row columns, the
span read at a run's start, the writer process's pickling, and the views' generated SQL."""

from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest

from langchain_bq_audit import otel_names, views
from langchain_bq_audit.context import otel_span_ids
from langchain_bq_audit.records import RunRecord
from langchain_bq_audit.rows import build_row
from langchain_bq_audit.writer_process import _dumps


def record(metadata: dict[str, Any] | None = None) -> RunRecord:
    rec = RunRecord("chain", uuid.uuid4(), None, uuid.uuid4(), None, {"q": "x"}, "writer", None,
                    metadata, None, 1.0)  # fmt: skip
    rec.end_time = 2.0
    return rec


def test_langgraph_metadata_becomes_columns_and_stays_in_metadata() -> None:
    meta = {
        "langgraph_step": 3, "langgraph_node": "writer", "langgraph_triggers": ["branch:to:writer"],
        "langgraph_path": ["__pregel_pull", "writer"],
        "langgraph_checkpoint_ns": "research:1f0c|writer:9e2a", "checkpoint_ns": "research:1f0c",
    }  # fmt: skip
    row = build_row(record(meta))
    assert (row["langgraph_node"], row["langgraph_step"], row["langgraph_checkpoint_ns"]) == (
        "writer", 3, "research:1f0c|writer:9e2a")  # fmt: skip
    assert json.loads(row["metadata"]) == meta


def test_runs_outside_a_graph_and_odd_values_leave_the_columns_out() -> None:
    for meta in (None, {"session_id": "s"}):
        row = build_row(record(meta))
        assert not {"langgraph_node", "langgraph_step", "langgraph_checkpoint_ns"} & row.keys()
    odd = build_row(record({"langgraph_node": 7, "langgraph_step": "two", "checkpoint_ns": "a:1"}))
    assert "langgraph_node" not in odd and "langgraph_step" not in odd
    assert odd["langgraph_checkpoint_ns"] == "a:1"  # `checkpoint_ns` when LangGraph's is absent
    assert json.loads(odd["metadata"])["langgraph_step"] == "two"


def test_otel_ids_are_w3c_lowercase_hex_and_absent_without_a_span() -> None:
    rec = record()
    rec.otel = (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)
    row = build_row(rec)
    assert row["otel_trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert row["otel_span_id"] == "b7ad6b7169203331"
    assert "otel_trace_id" not in build_row(record())


def test_otel_ids_cross_to_the_writer_process() -> None:
    rec = record({"langgraph_node": "writer"})
    rec.otel = (1, 2)
    (copy,) = pickle.loads(_dumps([rec]))
    assert copy.otel == (1, 2)
    assert build_row(copy)["otel_span_id"] == "0000000000000002"


def test_the_current_span_is_read_when_valid_and_sampled() -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    tracer = sdk.TracerProvider().get_tracer("test")
    assert otel_span_ids() is None  # no span: the invalid one
    with tracer.start_as_current_span("request") as span:
        ctx = span.get_span_context()
        assert otel_span_ids() == (ctx.trace_id, ctx.span_id)
    assert otel_span_ids() is None
    with sdk.TracerProvider(sampler=ALWAYS_OFF).get_tracer("t").start_as_current_span("off"):
        assert otel_span_ids() is None  # not sampled: recorded nowhere, joins nothing
    # a sampled parent propagated from another process (no span of this one): joinable
    remote = trace.SpanContext(5, 6, is_remote=True, trace_flags=trace.TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(remote)):
        assert otel_span_ids() == (5, 6)


def test_nested_columns_name_the_dotted_path() -> None:
    items = views._nested({"gen_ai.usage.input_tokens": "a", "gen_ai.usage.output_tokens": "b",
                           "gen_ai.operation.name": "c", "error.type": "d"})  # fmt: skip
    assert items == [
        "STRUCT(STRUCT(a AS `input_tokens`, b AS `output_tokens`) AS `usage`, "
        "STRUCT(c AS `name`) AS `operation`) AS `gen_ai`",
        "STRUCT(d AS `type`) AS `error`",
    ]
    with pytest.raises(ValueError, match="both a value and a prefix"):
        views._nested({"a.b": "x", "a.b.c": "y"})


def test_the_node_path_drops_task_ids() -> None:
    assert views.NODE_PATH == r"REGEXP_REPLACE(langgraph_checkpoint_ns, r':[^|]*', '')"
    sql = views.nodes("p.d.t")
    assert "FROM `p.d.t_dedup`" in sql and "GROUP BY node_path, langgraph_node" in sql


def test_otel_names_match_the_installed_semantic_conventions() -> None:
    pytest.importorskip("opentelemetry.semconv")
    path = Path(__file__).resolve().parents[2] / "scripts" / "gen_otel_names.py"
    spec = importlib.util.spec_from_file_location("gen_otel_names", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for module_name, names in script.ATTRIBUTES.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert getattr(otel_names, name) == getattr(module, name), name
    for module_name, enums in script.VALUES.items():
        module = importlib.import_module(module_name)
        for enum_name, members in enums.items():
            for member in members:
                ours = getattr(getattr(otel_names, enum_name), member)
                assert ours == getattr(getattr(module, enum_name), member).value, member
    # and the view's columns are those names, nested by their dots
    sql = views.otel("p.d.t")
    for name in (otel_names.GEN_AI_USAGE_INPUT_TOKENS, otel_names.GEN_AI_OPERATION_NAME):
        assert all(f"AS `{part}`" in sql for part in name.split("."))
