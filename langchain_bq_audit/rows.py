"""Pure functions: one finished `RunRecord` -> one row dict whose keys are schema columns.

Runs on the writer thread. Never raises: `build_row` falls back to a minimal row that keeps
the run's identity and says what went wrong, so a strange input cannot lose a row.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from .records import RunRecord
from .schema import JSON_COLUMNS

_UTC = _dt.timezone.utc
_MAX_DEPTH = 32
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}
_SECRET_NAMES = frozenset(
    {"api_key", "apikey", "token", "password", "passwd", "secret", "authorization", "auth"}
)
_SECRET_SUFFIXES = ("_api_key", "_apikey", "_secret", "_password", "_token", "_credentials")


def iso(ts: float) -> str:
    """Epoch seconds -> ISO-8601 UTC (what insertAll wants for TIMESTAMP)."""
    return _dt.datetime.fromtimestamp(ts, _UTC).isoformat()


def is_secret_key(key: str) -> bool:
    """True for keys that usually hold credentials (but not e.g. `max_tokens`)."""
    k = key.lower().replace("-", "_")
    return k in _SECRET_NAMES or k.endswith(_SECRET_SUFFIXES)


# -- JSON -------------------------------------------------------------------------------------


def to_jsonable(value: Any, _depth: int = 0, _seen: set[int] | None = None) -> Any:
    """Any Python value -> something `json.dumps` accepts, without raising.

    Cycles and excessive depth become marker strings; unknown objects become their repr.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if _depth >= _MAX_DEPTH:
        return "<max depth>"
    seen = set() if _seen is None else _seen
    vid = id(value)
    if vid in seen:
        return "<cycle>"
    seen.add(vid)
    try:
        return _container_to_jsonable(value, _depth + 1, seen)
    finally:
        seen.discard(vid)


def _container_to_jsonable(value: Any, depth: int, seen: set[int]) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): (
                "<removed>"
                if isinstance(k, str) and is_secret_key(k)
                else to_jsonable(v, depth, seen)
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v, depth, seen) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if type(value).__name__ == "SecretStr":
        return "<removed>"
    dump = getattr(value, "model_dump", None)  # pydantic models, LangChain messages
    if callable(dump):
        try:
            return to_jsonable(dump(), depth, seen)
        except Exception:
            pass
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_jsonable(getattr(value, f.name, None), depth, seen)
            for f in dataclasses.fields(value)
        }
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def dumps(value: Any) -> str:
    """Compact JSON of any value; never raises."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(to_jsonable(value), separators=(",", ":"), allow_nan=False)


# -- text -------------------------------------------------------------------------------------


def content_text(content: Any) -> str:
    """Message content (a string or a list of parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                kind = part.get("type", "part")
                parts.append(str(part["text"]) if "text" in part else f"[{kind}]")
            else:
                parts.append(str(part))
        return "\n".join(parts)
    return "" if content is None else str(content)


def message_role(message: Any) -> str:
    kind = getattr(message, "type", None) or "message"
    if kind == "chat":
        return str(getattr(message, "role", "chat"))
    return _ROLES.get(kind, kind.replace("Chunk", "").lower())


def messages_text(messages: Any) -> str:
    """Messages as readable `role: content` lines."""
    return "\n".join(
        f"{message_role(m)}: {content_text(getattr(m, 'content', m))}" for m in messages
    )


def message_dict(message: Any) -> dict[str, Any]:
    """A message as a small JSON-able dict (role, content, and what else it carries)."""
    out: dict[str, Any] = {"role": message_role(message), "content": message.content}
    for attr in ("name", "tool_call_id", "id"):
        value = getattr(message, attr, None)
        if value:
            out[attr] = value
    tool_calls = getattr(message, "tool_calls", None)
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


def _is_message(value: Any) -> bool:
    return hasattr(value, "content") and hasattr(value, "type")


def render(value: Any) -> str:
    """A chain/tool input or output as readable text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if _is_message(value):
        return content_text(value.content)
    if isinstance(value, Mapping):
        if len(value) == 1:
            only = next(iter(value.values()))
            if isinstance(only, str) or _is_message(only):
                return render(only)
        return dumps(value)
    if isinstance(value, (list, tuple)) and value and all(_is_message(v) for v in value):
        return messages_text(value)
    to_string = getattr(value, "to_string", None)  # PromptValue
    if callable(to_string):
        try:
            return str(to_string())
        except Exception:
            pass
    page_content = getattr(value, "page_content", None)  # a Document
    if isinstance(page_content, str):
        return page_content
    return dumps(value)


# -- model runs -------------------------------------------------------------------------------


def _first_generation(response: Any) -> Any:
    generations = getattr(response, "generations", None)
    if generations and generations[0]:
        return generations[0][0]
    return None


def _usage(response: Any, gen: Any) -> tuple[int | None, int | None, int | None, str]:
    message = getattr(gen, "message", None)
    usage = getattr(message, "usage_metadata", None)
    if usage:
        return (
            usage.get("input_tokens"),
            usage.get("output_tokens"),
            usage.get("total_tokens"),
            "provider",
        )
    llm_output = getattr(response, "llm_output", None) or {}
    usage = llm_output.get("token_usage") or llm_output.get("usage")
    if isinstance(usage, Mapping) and usage:
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        total = usage.get("total_tokens")
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        return prompt, completion, total, "provider"
    return None, None, None, "missing"


def _model_row(rec: RunRecord, row: dict[str, Any]) -> None:
    params = rec.invocation_params or {}
    meta = rec.metadata or {}
    response = rec.outputs
    gen = _first_generation(response)
    message = getattr(gen, "message", None)
    response_meta = getattr(message, "response_metadata", None) or {}
    llm_output = getattr(response, "llm_output", None) or {}

    row["model_name"] = _first_str(
        response_meta.get("model_name"),
        response_meta.get("model"),
        llm_output.get("model_name"),
        params.get("model"),
        params.get("model_name"),
        meta.get("ls_model_name"),
    )
    row["provider"] = _first_str(meta.get("ls_provider"), params.get("_type"))
    if params:
        row["invocation_params"] = dumps(to_jsonable(params))

    if rec.run_type == "chat_model":
        batches = rec.inputs or []
        first = batches[0] if batches else []
        row["input_text"] = messages_text(first)
        row["input_messages"] = dumps(to_jsonable([message_dict(m) for m in first]))
    else:
        row["input_text"] = "\n\n".join(str(p) for p in (rec.inputs or []))

    if gen is not None:
        row["output_text"] = content_text(message.content) if message is not None else str(gen.text)
        gens = response.generations[0]
        if message is not None:
            row["output_messages"] = dumps(to_jsonable([message_dict(g.message) for g in gens]))
            calls = getattr(message, "tool_calls", None)
            if calls:
                row["tool_calls"] = dumps(
                    to_jsonable(
                        [
                            {"name": c.get("name"), "args": c.get("args"), "id": c.get("id")}
                            for c in calls
                        ]
                    )
                )
        else:
            row["output_messages"] = dumps([{"text": g.text} for g in gens])
    prompt, completion, total, source = _usage(response, gen)
    row["prompt_tokens"] = prompt
    row["completion_tokens"] = completion
    row["total_tokens"] = total
    row["token_usage_source"] = source


def _first_str(*values: Any) -> str | None:
    for v in values:
        if v:
            return str(v)
    return None


def _name(rec: RunRecord) -> str | None:
    if rec.name:
        return str(rec.name)
    ser = rec.serialized or {}
    if ser.get("name"):
        return str(ser["name"])
    ids = ser.get("id")
    if isinstance(ids, list) and ids:
        return str(ids[-1])
    return None


def _clean_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if not (isinstance(k, str) and is_secret_key(k))}


# -- the row ----------------------------------------------------------------------------------


def build_row(
    rec: RunRecord,
    *,
    max_field_chars: int = 200_000,
    app_name: str | None = None,
    environment: str | None = None,
) -> dict[str, Any]:
    """The row for one finished run. Never raises."""
    try:
        row = _build(rec, app_name, environment)
    except Exception as exc:  # a strange input: keep the run, say why its content is missing
        row = _minimal_row(rec, app_name, environment)
        row["error_message"] = f"langchain-bq-audit could not render this run: {exc!r}"[:2000]
    _cap(row, max_field_chars)
    return row


def _identity(rec: RunRecord, app_name: str | None, environment: str | None) -> dict[str, Any]:
    meta = rec.metadata or {}
    end = rec.end_time if rec.end_time is not None else rec.start_time
    session = meta.get("session_id") or meta.get("thread_id") or meta.get("conversation_id")
    user = meta.get("user_id") or meta.get("user")
    return {
        "timestamp": iso(end),
        "input_text": "",
        "output_text": "",
        "user_id": str(user) if user else rec.user_id,
        "session_id": str(session) if session else rec.session_id,
        "event_id": str(rec.run_id),
        "run_id": str(rec.run_id),
        "parent_run_id": str(rec.parent_run_id) if rec.parent_run_id else None,
        "trace_id": str(rec.trace_id),
        "run_type": rec.run_type,
        "name": _name(rec),
        "status": rec.status,
        "start_time": iso(rec.start_time),
        "latency_ms": round((end - rec.start_time) * 1000.0, 3),
        "tags": [str(t) for t in rec.tags] if rec.tags else [],
        "app_name": app_name,
        "environment": environment,
    }


def _minimal_row(rec: RunRecord, app_name: str | None, environment: str | None) -> dict[str, Any]:
    try:
        return _identity(rec, app_name, environment)
    except Exception:
        return {
            "timestamp": iso(rec.end_time or rec.start_time),
            "input_text": "",
            "output_text": "",
            "event_id": str(rec.run_id),
            "run_id": str(rec.run_id),
            "run_type": str(rec.run_type),
            "status": str(rec.status),
            "tags": [],
        }


def _build(rec: RunRecord, app_name: str | None, environment: str | None) -> dict[str, Any]:
    row = _identity(rec, app_name, environment)
    if rec.first_token_time is not None:
        row["time_to_first_token_ms"] = round((rec.first_token_time - rec.start_time) * 1000, 3)
    if rec.metadata:
        row["metadata"] = dumps(to_jsonable(_clean_meta(rec.metadata)))
    if rec.run_type in ("llm", "chat_model"):
        _model_row(rec, row)
    elif rec.run_type == "retriever":
        row["input_text"] = render(rec.inputs)
        docs = rec.outputs or []
        row["output_text"] = f"{len(docs)} documents"
        row["output_messages"] = dumps(
            to_jsonable(
                [
                    {"id": getattr(d, "id", None), "metadata": getattr(d, "metadata", None)}
                    for d in docs
                ]
            )
        )
    else:
        row["input_text"] = render(rec.inputs)
        row["output_text"] = render(getattr(rec.outputs, "content", rec.outputs))
    if rec.error is not None:
        row["error_type"] = type(rec.error).__name__
        row["error_message"] = str(rec.error)
        row["output_text"] = ""
    return row


def _cap(row: dict[str, Any], limit: int) -> None:
    """Cut every text to `limit` characters; JSON that is too long becomes a valid stub."""
    truncated = False
    for key, value in row.items():
        if isinstance(value, str) and len(value) > limit:
            truncated = True
            if key in JSON_COLUMNS:
                row[key] = dumps({"truncated": True, "chars": len(value), "head": value[:limit]})
                if len(row[key]) > limit + 100:
                    row[key] = dumps({"truncated": True, "chars": len(value)})
            else:
                row[key] = value[:limit]
    row["is_truncated"] = truncated


def row_size(row: dict[str, Any]) -> int:
    """A cheap upper-ish estimate of the row's JSON size in bytes, for batching."""
    size = 64
    for value in row.values():
        if isinstance(value, str):
            size += len(value) + 16
        elif isinstance(value, list):
            size += sum(len(v) + 4 for v in value) + 8
        else:
            size += 24
    return size
