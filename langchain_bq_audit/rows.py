"""Pure functions: one finished `RunRecord` -> one row dict whose keys are schema columns.

Runs on the writer thread. Never raises: `build_row` falls back to a minimal row that keeps
the run's identity and says what went wrong, so a strange input cannot lose a row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import itertools
import json
import math
import operator
import os
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from uuid import UUID

from .context import SESSION_KEYS, USER_KEYS
from .cost import row_cost
from .jsoncodec import plain_json
from .records import RunRecord, is_graph_bubble_up
from .redact import REMOVED, capture, is_secret_key, may_hold_secret_key, redact_row
from .schema import JSON_COLUMNS
from .settings import AuditSettings

_UTC = _dt.timezone.utc
_MAX_DEPTH = 32
_MAX_ITEMS = 10_000  # items kept of one list or dict in JSON columns
_MAX_EXACT_INT = 2**53
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}
_class_attrs: dict[tuple[type, str], bool] = {}  # (message type, attribute): on the class?
_model_lacks: dict[tuple[type, str], bool] = {}  # (type, attribute): see `_getattr`
_MISSING = object()
_id_text: dict[UUID, str] = {}  # a trace's ids recur in its other rows (parent, trace)
_DEFAULT_SETTINGS = AuditSettings()
_CANCELLED = (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)
_SCALARS = frozenset({type(None), bool, int, float})
# One encoder, made once: `json.dumps` with options builds a new one on every call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode
# Content part types that carry media: they become a placeholder whatever they hold. Other
# non-text parts (reasoning, thinking, tool_use, citations, ...) keep their text; media
# values inside them are replaced one by one (`media_text`).
MEDIA_PART_TYPES = frozenset(
    {"image", "image_url", "input_image", "audio", "input_audio", "file", "input_file",
     "video", "media"}
)  # fmt: skip
_MEDIA_MIN_CHARS = 1024  # a bare base64 blob shorter than this is kept as text
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[^;,]*)*(?:;base64)?,", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/_\-\r\n]+={0,2}")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{1024}")
_SNIFF_B64 = (("iVBORw0KGg", "image/png"), ("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"),
              ("UklGR", "image/webp"), ("JVBERi0", "application/pdf"))  # fmt: skip
_SNIFF_BYTES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                (b"RIFF", "image/webp"), (b"%PDF", "application/pdf"))  # fmt: skip


def _new_event_prefix() -> str:
    return str(uuid.uuid4())[:24]


# Event ids: a random UUID4 head per process and a counter, so each row's id is unique
# across processes and costs a string format, not a UUID (about 2 us a row).
_event_prefix = _new_event_prefix()
_event_count = itertools.count(1)


def _after_fork() -> None:
    global _event_prefix
    _event_prefix = _new_event_prefix()  # a forked child must not repeat the parent's ids


os.register_at_fork(after_in_child=_after_fork)


def new_event_id() -> str:
    """A new row id, UUID4-shaped: its own for every row, even when run ids repeat."""
    return f"{_event_prefix}{next(_event_count) & 0xFFFFFFFFFFFF:012x}"


def event_id(rec: RunRecord) -> str:
    """The run's row id, given once: a run built twice (in the application and, from its
    pickled copy, in the writer process) gives two copies of one row, which dedup merges."""
    eid = rec.event_id
    if eid is None:
        eid = rec.event_id = new_event_id()
    return eid


_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def iso(ts: float) -> str:
    """Epoch seconds -> ISO-8601 UTC with microseconds (what insertAll wants for TIMESTAMP).

    The date and time of day are formatted once a second: rows come many a second.
    """
    global _last_second
    second, micros = divmod(round(ts * 1_000_000), 1_000_000)
    last, text = _last_second
    if second != last:
        text = _dt.datetime.fromtimestamp(second, _UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (second, text)
    return f"{text}.{micros:06d}+00:00"


def clean_text(text: str) -> str:
    """`text` as valid UTF-8: lone surrogates (from undecodable bytes) become U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # utf-16 with surrogatepass pairs up what can be paired; the rest decodes to U+FFFD
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


# -- JSON -------------------------------------------------------------------------------------


def to_jsonable(value: Any, _depth: int = 0, _seen: set[int] | None = None) -> Any:
    """Any Python value -> something `json.dumps` accepts, without raising.

    Cycles and excessive depth become marker strings, secret-looking keys and `SecretStr`
    values are removed, media (data URLs, base64 blobs, bytes) become a placeholder such as
    `<image/png 40022 bytes>`, numbers stay numbers (numpy scalars and arrays, `Decimal`s a
    double holds exactly; other `Decimal`s as their exact digits), unknown objects their repr.
    """
    kind = type(value)
    if kind is str:
        if len(value) < _MEDIA_MIN_CHARS and not value.startswith("data:"):
            return value
        return media_text(value) or value
    if value is None or kind is bool:
        return value
    if kind is int or isinstance(value, int):
        # BigQuery JSON keeps numbers exactly only within a double's 53 bits
        return int(value) if -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT else str(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):  # a subclass (an enum, numpy's str_): its plain text
        return to_jsonable(str.__str__(value))
    if kind.__module__ == "numpy":  # only then: numpy stays optional
        return to_jsonable(_from_numpy(value), _depth, _seen)
    if kind is Decimal:
        return _decimal(value)
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
    if type(value) is dict or isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= _MAX_ITEMS:
                out["<more keys>"] = len(value) - _MAX_ITEMS
                break
            key = k if isinstance(k, str) else str(to_jsonable(k, depth, seen))
            out[key] = REMOVED if is_secret_key(key) else to_jsonable(v, depth, seen)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_jsonable(v, depth, seen) for v in itertools.islice(value, _MAX_ITEMS)]
        if len(value) > _MAX_ITEMS:
            items.append(f"<{len(value) - _MAX_ITEMS} more items>")
        return items
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        head = bytes(value[:4])
        mime = next((m for magic, m in _SNIFF_BYTES if head.startswith(magic)), "")
        return _placeholder(mime, len(value))
    if type(value).__name__ in ("SecretStr", "SecretBytes"):
        return REMOVED
    if _is_message(value):
        return message_dict(value)
    dump = getattr(value, "model_dump", None)  # pydantic models
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
        text = repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"
    return text if len(text) <= 1000 else text[:1000] + "…"


def _from_numpy(value: Any) -> Any:
    """A numpy scalar or array as Python numbers and lists (float32/16 at their shortest
    decimal, `0.87` rather than `0.8700000047683716`)."""
    ndim = getattr(value, "ndim", None)
    if not ndim:  # a scalar or a 0-d array
        item = value.item() if callable(getattr(value, "item", None)) else value
        dtype = getattr(value, "dtype", None)
        if isinstance(item, float) and dtype is not None and dtype.itemsize < 8:
            return float(str(value))
        return item
    if value.dtype.kind == "f" and value.dtype.itemsize < 8:
        return [_from_numpy(v) for v in value[: _MAX_ITEMS + 1]]
    return value[: _MAX_ITEMS + 1].tolist()  # one more than kept: the cut says how many


def _decimal(value: Decimal) -> Any:
    """A JSON number when a double holds it exactly (`19.90` -> 19.9), else its exact digits."""
    if value.is_finite():
        number = float(value)
        if Decimal(repr(number)) == value:
            return number
    return str(value)


def _placeholder(mime: str, size: int) -> str:
    return f"<{mime} {size} bytes>" if mime else f"<{size} bytes>"


def media_text(value: str) -> str | None:
    """The placeholder of a data URL or a base64 blob (`<image/png 40022 bytes>`, the size
    being the characters it held), or None when `value` is text."""
    if value.startswith("data:"):
        match = _DATA_URL.match(value)
        if match:
            return _placeholder(match.group(1) or "", len(value))
    if len(value) < _MEDIA_MIN_CHARS:
        return None
    mime = next((m for head, m in _SNIFF_B64 if value.startswith(head)), "")
    # base64 of binary data uses most of its alphabet: a long run of one letter is text
    if (mime or len(set(value[:256])) >= 20) and _BASE64.fullmatch(value):
        return _placeholder(mime, len(value))
    return None


def dumps(value: Any) -> str:
    """Compact JSON of any value, valid UTF-8; never raises."""
    try:
        text = _ENCODE(value)
    except (TypeError, ValueError, RecursionError):
        text = _ENCODE(to_jsonable(value))
    return clean_text(text)


def _plain(value: Any, depth: int = 0) -> bool:
    """True when `to_jsonable(value)` gives `value` back (the same JSON) and `plain_json`
    writes it as `dumps` does: builtin containers within the depth and size limits, keys
    that are `str`s and not secret-looking, text that is not media, ints within a double's
    53 bits, floats `exact_float` leaves alone."""
    kind = type(value)
    if kind is str:
        return (len(value) < _MEDIA_MIN_CHARS and not value.startswith("data:")) or (
            media_text(value) is None
        )
    if kind is dict:
        if depth >= _MAX_DEPTH or len(value) > _MAX_ITEMS:
            return False
        for key, item in value.items():
            if type(key) is not str or is_secret_key(key) or not _plain(item, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        if depth >= _MAX_DEPTH or len(value) > _MAX_ITEMS:
            return False
        for item in value:  # noqa: SIM110 (a plain loop: `all()` costs a generator)
            if not _plain(item, depth + 1):
                return False
        return True
    if value is None or kind is bool:
        return True
    if kind is int:
        return bool(-_MAX_EXACT_INT <= value <= _MAX_EXACT_INT)
    if kind is float:  # finite, and written without an exponent (see `exact_float`)
        return bool(1e-4 <= abs(value) < 1e16 or value == 0.0)
    return False


def json_column(value: Any) -> str:
    """`dumps(to_jsonable(value))`: a JSON column's text. Values `to_jsonable` would give
    back unchanged (most: metadata, params, messages) skip its copy and are encoded by
    orjson, with the same text."""
    if _plain(value):
        return plain_json(value) or dumps(value)
    return dumps(to_jsonable(value))


# -- messages and text ------------------------------------------------------------------------


def _is_message(value: Any) -> bool:
    return _getattr(value, "content", _MISSING) is not _MISSING and isinstance(
        _getattr(value, "type", None), str
    )


def _getattr(obj: Any, name: str, default: Any) -> Any:
    """`getattr(obj, name, default)`, without the exception pydantic's `__getattr__` raises
    (a few microseconds) when a model lacks `name`, as a `ChatPromptValue` lacks `content`
    and `type`: then neither its type (nor its private attributes), its `__dict__` nor its
    extra fields hold `name`, which is what that `__getattr__` looks at. Other objects and
    names go to `getattr`."""
    kind = type(obj)
    lacks = _model_lacks.get((kind, name))
    if lacks is None:
        if len(_model_lacks) >= 4096:  # bounded; a process sees few types
            _model_lacks.clear()
        lacks = _model_lacks[kind, name] = _pydantic_lacks(kind, name)
    if lacks and name not in obj.__dict__:
        extra = getattr(obj, "__pydantic_extra__", None)
        if not extra or name not in extra:
            return default
    return getattr(obj, name, default)


def _pydantic_lacks(kind: type, name: str) -> bool:
    """True when `kind` is a pydantic model (its attribute lookup pydantic's own) whose
    class has no attribute `name` and no private attribute of that name."""
    hook = getattr(kind, "__getattr__", None)
    return (
        getattr(hook, "__module__", None) == "pydantic.main"
        and getattr(hook, "__qualname__", None) == "BaseModel.__getattr__"
        and kind.__getattribute__ is object.__getattribute__  # type: ignore[comparison-overlap]
        and isinstance(getattr(kind, "__private_attributes__", None), dict)
        and name not in kind.__private_attributes__  # type: ignore[attr-defined]
        and not hasattr(kind, name)
    )


def _part_placeholder(part: Mapping[str, Any]) -> dict[str, Any]:
    """A multimodal content part (image, audio, file) as type and size, never its data."""
    kind = str(part.get("type", "part"))
    out: dict[str, Any] = {"type": kind}
    size = 0
    for key, value in part.items():
        if key == "type":
            continue
        if isinstance(value, Mapping):  # e.g. {"image_url": {"url": "data:..."}}
            inner = _part_placeholder({"type": kind, **value})
            size += inner.pop("bytes", 0)
            inner.pop("type", None)
            out.update(inner)
        elif isinstance(value, str) and (len(value) > 256 or value.startswith("data:")):
            size += len(value)
            if value.startswith("data:"):
                out.setdefault("mime_type", value[5 : value.find(";")] if ";" in value else "")
        elif isinstance(value, (bytes, bytearray)):
            size += len(value)
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
    if size:
        out["bytes"] = size
    return out


def content_parts(content: Any) -> Any:
    """Message content with every media part (`MEDIA_PART_TYPES`) replaced by its
    placeholder; other parts are kept (their media values are replaced by `to_jsonable`)."""
    if not isinstance(content, list):
        return content
    out: list[Any] = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") in MEDIA_PART_TYPES:
            out.append(_part_placeholder(part))
        else:
            out.append(part)
    return out


def content_text(content: Any) -> str:
    """Message content (a string or a list of parts) as plain text; media as `[image]`."""
    if isinstance(content, str):
        return text_value(content)
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(text_value(part))
            elif isinstance(part, Mapping):
                if part.get("type", "text") == "text" and "text" in part:
                    parts.append(text_value(str(part["text"])))
                else:
                    parts.append(f"[{part.get('type', 'part')}]")
            else:
                parts.append(str(part))
        return "\n".join(parts)
    return "" if content is None else str(content)


def message_role(message: Any) -> str:
    """user, assistant, system, tool, or a chat message's own role."""
    kind: str = getattr(message, "type", None) or "message"
    if kind == "chat":
        return str(getattr(message, "role", "chat"))
    kind = kind.replace("Chunk", "").lower()
    return _ROLES.get(kind, kind)


def messages_text(messages: Any) -> str:
    """Messages as readable `role: content` lines."""
    return "\n".join(
        f"{message_role(m)}: {content_text(getattr(m, 'content', m))}" for m in messages
    )


def message_dict(message: Any) -> dict[str, Any]:
    """A message as a small JSON-able dict: role, content (media as placeholders), ids."""
    out: dict[str, Any] = {
        "role": message_role(message),
        "content": content_parts(message.content),
    }
    for attr in ("name", "tool_call_id", "id"):
        value = _attr(message, attr)
        if value:
            out[attr] = value
    tool_calls = _attr(message, "tool_calls")
    if tool_calls:
        out["tool_calls"] = [_tool_call(c) for c in tool_calls]
    return out


def _attr(obj: Any, name: str) -> Any:
    """`getattr(obj, name, None)`, without pydantic's slow `__getattr__` for a field the
    object's type lacks (tool_call_id on a HumanMessage): fields live in `__dict__`,
    properties on the class."""
    fields = getattr(obj, "__dict__", None)
    if fields is None or name in fields:
        return getattr(obj, name, None) if fields is None else fields[name]
    kind = type(obj)
    on_class = _class_attrs.get((kind, name))
    if on_class is None:  # pydantic's metaclass makes a miss cost an exception
        on_class = _class_attrs[kind, name] = hasattr(kind, name)
    return getattr(obj, name, None) if on_class else None


def _tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": call.get("name"), "args": call.get("args"), "id": call.get("id")}


def text_value(text: str) -> str:
    """`text` (as a plain `str`), or its placeholder when it is media (a data URL or a base64
    blob)."""
    if type(text) is not str:  # langchain-core's TextAccessor (`message.text`), an enum...
        text = str.__str__(text)
    if len(text) < _MEDIA_MIN_CHARS and not text.startswith("data:"):
        return text
    return media_text(text) or text


def json_text(value: Any) -> str:
    """Compact JSON of any value with media replaced by placeholders and the values of
    secret-looking keys removed at any depth; never raises."""
    if _plain(value):  # nothing to replace or remove (what `to_jsonable` would find)
        return plain_json(value) or dumps(value)
    try:
        text = _ENCODE(value)  # most values hold no media and no secret-looking key
    except (TypeError, ValueError, RecursionError):  # converted anyway: as the check redoes
        return dumps(to_jsonable(value))
    text = clean_text(text)
    if (len(text) > 64 and ("data:" in text or _BASE64_RUN.search(text))) or (
        may_hold_secret_key(text)  # `to_jsonable` checks every key
    ):
        text = dumps(to_jsonable(value))
    return text


def render(value: Any) -> str:
    """A chain, tool or retriever input or output as readable text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return text_value(value)
    if _is_message(value):
        return content_text(value.content)
    if isinstance(value, Mapping):
        if len(value) == 1:
            key, only = next(iter(value.items()))
            if (isinstance(only, str) or _is_message(only)) and not (
                isinstance(key, str) and is_secret_key(key)
            ):
                return render(only)
        return json_text(value)
    if isinstance(value, (list, tuple)) and value and all(_is_message(v) for v in value):
        return messages_text(value)
    messages = getattr(value, "messages", None)  # a ChatPromptValue: lines like a model's
    if isinstance(messages, list) and messages and all(_is_message(v) for v in messages):
        return messages_text(messages)
    to_string = getattr(value, "to_string", None)  # a PromptValue
    if callable(to_string):
        try:
            return str(to_string())
        except Exception:
            pass
    page_content = getattr(value, "page_content", None)  # a Document
    if isinstance(page_content, str):
        return text_value(page_content)
    return json_text(value)


# -- token usage ------------------------------------------------------------------------------


_INT64 = range(-(2**63), 2**63)


def _int(value: Any) -> int | None:
    """An INT64 column's value: an int (or a whole float, a numpy integer) BigQuery can hold,
    else None, so one absurd count never costs the row (insertAll refuses the whole row)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = int(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        number = int(value)
    else:
        try:
            number = operator.index(value)  # numpy integers
        except TypeError:
            return None
    return number if number in _INT64 else None


def _present(*values: Any) -> Any:
    """The first value that is not None: a count of 0 is a count."""
    for value in values:
        if value is not None:
            return value
    return None


def _get(mapping: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _usage_from_mapping(usage: Mapping[str, Any]) -> dict[str, int | None] | None:
    """One usage dict of any known provider shape -> our six counts, or None. Input counts
    every input token, cached or not (LangChain's `input_tokens`; genai-prices' too)."""
    prompt = _int(
        _present(
            usage.get("input_tokens"), usage.get("prompt_tokens"), usage.get("prompt_token_count")
        )
    )
    completion = _int(
        _present(
            usage.get("output_tokens"),
            usage.get("completion_tokens"),
            usage.get("candidates_token_count"),
        )
    )
    total = _int(_present(usage.get("total_tokens"), usage.get("total_token_count")))
    if prompt is None and completion is None and total is None:
        return None
    cache_read = _int(
        _present(
            _get(usage, "input_token_details", "cache_read"),  # LangChain UsageMetadata
            _get(usage, "prompt_tokens_details", "cached_tokens"),  # OpenAI
            usage.get("cache_read_input_tokens"),  # Anthropic
            usage.get("cached_content_token_count"),  # Gemini
        )
    )
    # Anthropic's own usage counts only uncached input in `input_tokens` and writes to the
    # cache apart (OpenAI writes to its cache for free: it has no such count)
    anthropic_write = _int(usage.get("cache_creation_input_tokens"))
    cache_write = _present(
        _int(_get(usage, "input_token_details", "cache_creation")), anthropic_write
    )
    if prompt is not None and ("cache_read_input_tokens" in usage or anthropic_write is not None):
        prompt = _int(
            prompt + (_int(usage.get("cache_read_input_tokens")) or 0) + (anthropic_write or 0)
        )
    if total is None and prompt is not None and completion is not None:
        total = _int(prompt + completion)
    reasoning = _int(
        _present(
            _get(usage, "output_token_details", "reasoning"),
            _get(usage, "completion_tokens_details", "reasoning_tokens"),
            usage.get("thoughts_token_count"),
        )
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "cache_read_tokens": cache_read,
        "cache_write_tokens": cache_write,
        "reasoning_tokens": reasoning,
    }


_USAGE_KEYS = ("token_usage", "usage", "usage_metadata")


def token_usage(response: Any, streamed: bool) -> tuple[dict[str, int | None] | None, str]:
    """Exact token counts from an `LLMResult`, with where they came from.

    Looks, in order, at the message's `usage_metadata` (LangChain's standard; for a streamed
    call it is the sum over chunks, where providers put usage on the last chunk), then at
    provider shapes in `response_metadata` / `generation_info` (OpenAI `token_usage`,
    Anthropic `usage`, Gemini `usage_metadata`), then at `llm_output`. Never made up.
    """
    generations = getattr(response, "generations", None) or []
    for batch in generations:
        for gen in batch:
            message = getattr(gen, "message", None)
            usage = getattr(message, "usage_metadata", None)
            if usage:
                found = _usage_from_mapping(usage)
                if found:
                    return found, "stream" if streamed else "provider"
            for meta in (
                getattr(message, "response_metadata", None),
                getattr(gen, "generation_info", None),
            ):
                if not meta:  # None or {} (a model that reports no usage): nothing to look at
                    continue
                for key in _USAGE_KEYS:
                    usage = _get(meta, key)
                    if isinstance(usage, Mapping) and (found := _usage_from_mapping(usage)):
                        return found, "provider"
    llm_output = getattr(response, "llm_output", None)
    for key in _USAGE_KEYS if llm_output else ():
        usage = _get(llm_output, key)
        if isinstance(usage, Mapping) and (found := _usage_from_mapping(usage)):
            return found, "provider"
    return None, "missing"


# -- model runs -------------------------------------------------------------------------------


def _first_generation(response: Any) -> Any:
    generations = getattr(response, "generations", None)
    if generations and generations[0]:
        return generations[0][0]
    return None


def _first_str(*values: Any) -> str | None:
    for v in values:
        if v and isinstance(v, (str, int, float)):
            return str(v)
    return None


def _model_row(rec: RunRecord, row: dict[str, Any], settings: AuditSettings) -> None:
    params = rec.invocation_params if isinstance(rec.invocation_params, Mapping) else {}
    meta = rec.metadata or {}
    response = rec.outputs
    gen = _first_generation(response)
    message = getattr(gen, "message", None)
    response_meta = getattr(message, "response_metadata", None) or {}
    gen_info = getattr(gen, "generation_info", None) or {}
    llm_output = getattr(response, "llm_output", None) or {}

    row["model_name"] = _first_str(
        response_meta.get("model_name"),
        response_meta.get("model"),
        gen_info.get("model_name"),
        llm_output.get("model_name"),
        llm_output.get("model"),
        params.get("model"),
        params.get("model_name"),
        params.get("model_id"),
        meta.get("ls_model_name"),
    )
    row["provider"] = _first_str(
        meta.get("ls_provider"), response_meta.get("model_provider"), params.get("_type")
    )
    if params:
        row["invocation_params"] = json_column(params)

    if rec.run_type == "chat_model":
        batches = rec.inputs or []
        first = batches[0] if batches else []
        row["input_text"] = messages_text(first)
        row["input_messages"] = json_column([message_dict(m) for m in first])
    else:
        row["input_text"] = "\n\n".join(text_value(str(p)) for p in (rec.inputs or []))

    if gen is not None:
        gens = response.generations[0]
        if message is not None:
            row["output_text"] = content_text(message.content)
            row["output_messages"] = json_column([message_dict(g.message) for g in gens])
            calls = getattr(message, "tool_calls", None)
            if calls:
                row["tool_calls"] = json_column([_tool_call(c) for c in calls])
        else:
            row["output_text"] = str(gen.text)
            row["output_messages"] = dumps([{"text": str(g.text)} for g in gens])
    usage, source = token_usage(response, rec.first_token_time is not None)
    if usage:
        row.update(usage)
        row.update(row_cost(row, rec.start_time, settings.price_overrides))
    row["token_usage_source"] = source


# -- the row ----------------------------------------------------------------------------------


def ident_text(value: Any) -> str | None:
    """A session or user id as the text the row holds: ints (and numpy ints, UUIDs) become
    their digits once, here, before `user_id_key` hashes them; None and "" are no id."""
    if value is None or type(value) is str:
        return clean_text(value) if value else None
    if type(value).__module__ == "numpy":
        value = _from_numpy(value)
    text = str(value)
    return clean_text(text) if text else None


def _first_key(mapping: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        text = ident_text(mapping.get(key))
        if text is not None:
            return text
    return None


def resolve_session_user(
    metadata: Mapping[str, Any] | None,
    session_default: Any,
    user_default: Any,
    configured: tuple[Any, Any] | None = None,
    session_keys: tuple[str, ...] = SESSION_KEYS,
    user_keys: tuple[str, ...] = USER_KEYS,
) -> tuple[str | None, str | None]:
    """Session and user of a run. Precedence, first present wins:

    session: metadata `session_id`, `thread_id` (LangGraph), `conversation_id`; then the
    same keys of the run's `configurable` (`configured`, as `context.configured_identity`
    found them); then the default (`audit_context`, else the handler's);
    user: metadata `user_id`, `user`; then `configurable`'s; then the default.
    `session_keys` / `user_keys` are the lists to use (`AuditSettings`: yours, then these).
    """
    session = user = None
    if metadata:
        session = _first_key(metadata, session_keys)
        user = _first_key(metadata, user_keys)
    if configured is not None:
        session = session or ident_text(configured[0])
        user = user or ident_text(configured[1])
    return session or ident_text(session_default), user or ident_text(user_default)


def run_name(rec: RunRecord) -> str | None:
    """The row's `name`: the run's own, else its serialized name or class (also what the
    handler's `skip_names` matches)."""
    if rec.name:
        return str(rec.name)
    ser = rec.serialized if isinstance(rec.serialized, Mapping) else {}
    if ser.get("name"):
        return str(ser["name"])
    ids = ser.get("id")
    if isinstance(ids, list) and ids:
        return str(ids[-1])
    return None


def run_status(rec: RunRecord) -> str:
    """The row's `status`, from the callback that ended the run and from what it returned.

    `interrupted`: LangGraph's control flow (`GraphInterrupt` for `interrupt()`,
    `ParentCommand` for a hand-off, ...: the `GraphBubbleUp` family), raised by the run or,
    for an interrupt, by a run inside the graph; `cancelled`: a cancellation or a closed
    stream; `error`: an exception, or an error returned as a value (`returned_error`).
    """
    error = rec.error
    if error is not None:
        if is_graph_bubble_up(error):
            return "interrupted"
        if rec.status == "error" and isinstance(error, _CANCELLED):
            return "cancelled"
    elif rec.status == "ok" and returned_error(rec.outputs) is not None:
        return "error"
    return rec.status


def _is_error_tool_message(value: Any) -> bool:
    return _getattr(value, "type", None) == "tool" and getattr(value, "status", None) == "error"


def returned_error(value: Any) -> tuple[str, str] | None:
    """`(error_type, error_message)` of an error a run returned instead of raising, or None.

    - a `ToolMessage(status="error")`: what a tool with `handle_tool_error` or
      `handle_validation_error` returns for a tool call; also a list of them, and LangGraph
      `ToolNode`'s `{"messages": [...]}` when every message is one. The type is
      `ToolMessage`: the exception itself never reaches callbacks;
    - an exception object returned as the output.
    """
    if value is None or type(value) in _SCALARS or type(value) is str:
        return None
    if isinstance(value, BaseException):
        return type(value).__name__, error_text(value)
    if isinstance(value, Mapping):
        if len(value) != 1 or "messages" not in value:
            return None
        value = value["messages"]
    if _is_error_tool_message(value):
        return "ToolMessage", content_text(value.content)
    if isinstance(value, (list, tuple)) and value and all(map(_is_error_tool_message, value)):
        return "ToolMessage", "\n".join(content_text(m.content) for m in value)
    return None


def error_text(error: BaseException) -> str:
    """The row's `error_message` for an exception: its message; for LangGraph's control
    flow, the interrupt's value as JSON (a list when several interrupts), or the command's."""
    if is_graph_bubble_up(error):
        arg: Any = error.args[0] if len(error.args) == 1 else list(error.args)
        if isinstance(arg, (list, tuple)) and arg and all(hasattr(i, "value") for i in arg):
            values = [i.value for i in arg]  # Interrupt(value=..., id=...)
            arg = values[0] if len(values) == 1 else values
        return json_column(arg)
    return str(error) or type(error).__name__


def _metadata(rec: RunRecord) -> Mapping[str, Any] | None:
    """The run's metadata over its `audit_context`'s (the run's own keys win)."""
    ctx = rec.context
    if ctx is None or not ctx.metadata:
        return rec.metadata
    return {**ctx.metadata, **(rec.metadata or {})}


def _tags(rec: RunRecord) -> list[str]:
    if not rec.tags and rec.context is None:
        return []
    tags = list(rec.tags or ())
    if rec.context is not None:
        tags += [t for t in rec.context.tags if t not in tags]
    return [clean_text(str(t)) for t in tags]


def _id(value: UUID) -> str:
    text = _id_text.get(value)
    if text is None:
        if len(_id_text) >= 4096:  # bounded; a trace's rows come close together
            _id_text.clear()
        text = _id_text[value] = str(value)
    return text


def _identity(rec: RunRecord, settings: AuditSettings) -> dict[str, Any]:
    end = rec.end_time if rec.end_time is not None else rec.start_time
    session, user = resolve_session_user(
        _metadata(rec),
        rec.session_id,
        rec.user_id,
        rec.configured,
        settings.session_keys,
        settings.user_keys,
    )
    run_id = _id(rec.run_id)  # a parent's id was made when its children's rows were
    row: dict[str, Any] = {
        "timestamp": iso(end),
        "input_text": "",
        "output_text": "",
        "user_id": user,
        "session_id": session,
        "event_id": event_id(rec),
        "run_id": run_id,
        "parent_run_id": _id(rec.parent_run_id) if rec.parent_run_id else None,
        "trace_id": run_id if rec.trace_id == rec.run_id else _id(rec.trace_id),
        "run_type": rec.run_type,
        "name": run_name(rec),
        "status": run_status(rec),
        "start_time": iso(rec.start_time),
        "latency_ms": round((end - rec.start_time) * 1000.0, 3),
        "tags": _tags(rec),
        "app_name": settings.app_name,
        "environment": settings.environment,
        "sample_rate": rec.sample_rate,
    }
    if rec.otel is not None:  # W3C trace context: lowercase hex, 32 and 16 digits
        row["otel_trace_id"] = f"{rec.otel[0]:032x}"
        row["otel_span_id"] = f"{rec.otel[1]:016x}"
    return row


def _graph_columns(metadata: Mapping[str, Any], row: dict[str, Any]) -> None:
    """LangGraph's node, step and checkpoint namespace (`parent:<task id>|child:<task id>`
    in a subgraph), from the metadata it gives every run inside a node (kept there too)."""
    node = metadata.get("langgraph_node")
    if isinstance(node, str):
        row["langgraph_node"] = node
    step = _int(metadata.get("langgraph_step"))
    if step is not None:
        row["langgraph_step"] = step
    ns = metadata.get("langgraph_checkpoint_ns", metadata.get("checkpoint_ns"))
    if isinstance(ns, str) and ns:
        row["langgraph_checkpoint_ns"] = ns


def _build(rec: RunRecord, settings: AuditSettings) -> dict[str, Any]:
    row = _identity(rec, settings)
    if rec.first_token_time is not None:
        row["time_to_first_token_ms"] = round((rec.first_token_time - rec.start_time) * 1000, 3)
    metadata = _metadata(rec)
    if metadata:
        row["metadata"] = json_column(metadata)
        if "langgraph_node" in metadata or "checkpoint_ns" in metadata:  # inside a graph
            _graph_columns(metadata, row)
    status = row["status"]
    if rec.run_type in ("llm", "chat_model"):
        _model_row(rec, row, settings)
    elif rec.run_type == "retriever":
        row["input_text"] = render(rec.inputs)
        docs = list(rec.outputs or [])
        row["output_text"] = f"{len(docs)} documents"
        row["output_messages"] = json_column(
            [_document(d, settings.capture_documents) for d in docs]
        )
    else:
        row["input_text"] = render(rec.inputs)
        row["output_text"] = render(_getattr(rec.outputs, "content", rec.outputs))
    if rec.error is not None:
        row["error_type"] = type(rec.error).__name__
        row["error_message"] = error_text(rec.error)
    elif status == "error" and (returned := returned_error(rec.outputs)) is not None:
        row["error_type"], row["error_message"] = returned
    if status == "error":  # a cancelled or interrupted run keeps what it produced so far
        row["output_text"] = ""
    return row


def _document(doc: Any, with_text: bool) -> dict[str, Any]:
    out = {"id": getattr(doc, "id", None), "metadata": getattr(doc, "metadata", None)}
    if with_text:
        out["page_content"] = getattr(doc, "page_content", None)
    return out


def build_row(rec: RunRecord, settings: AuditSettings = _DEFAULT_SETTINGS) -> dict[str, Any]:
    """The row for one finished run. Never raises."""
    try:
        row = _build(rec, settings)
        for key, value in row.items():
            if isinstance(value, str) and not value.isascii():  # ASCII is valid UTF-8
                row[key] = clean_text(value)
    except Exception as exc:  # a strange input: keep the run, say why its content is missing
        row = _failed_row(rec, settings, "render", exc)
    try:
        _finish(row, settings)
    except Exception as exc:  # a redactor or an id that fails: the run still leaves a row
        row = _failed_row(rec, settings, "redact", exc)
        try:
            _finish(row, settings)
        except Exception:  # not even the identity passes: no user, no session, no text
            row.update(user_id=None, session_id=None, tags=[], is_truncated=True)
    return row


def _finish(row: dict[str, Any], settings: AuditSettings) -> None:
    capture(row, settings.capture_mode)
    # Redact the whole text, then cut: a cut first could leave a credential's head too
    # short for its pattern to recognise.
    redact_row(row, settings.capture_mode, settings.redactors, settings.user_id_key)
    fit_row(row, settings.max_field_chars, settings.max_row_bytes)


def _failed_row(
    rec: RunRecord, settings: AuditSettings, step: str, exc: Exception
) -> dict[str, Any]:
    """The run's identity, with `error_message` saying why the rest of the row is missing."""
    row = _minimal_row(rec, settings)
    row["error_message"] = f"langchain-bq-audit could not {step} this run: {exc!r}"[:2000]
    return row


def _minimal_row(rec: RunRecord, settings: AuditSettings) -> dict[str, Any]:
    try:
        return _identity(rec, settings)
    except Exception:
        return {
            "timestamp": iso(rec.end_time or rec.start_time),
            "input_text": "",
            "output_text": "",
            "event_id": event_id(rec),
            "run_id": str(rec.run_id),
            "run_type": str(rec.run_type),
            "status": str(rec.status),
            "tags": [],
        }


def _cut(key: str, value: str, limit: int) -> str:
    if key in JSON_COLUMNS:  # JSON must stay valid: keep a head of it as a string
        return dumps({"truncated": True, "chars": len(value), "head": value[: max(0, limit - 80)]})
    return value[:limit]


def fit_row(row: dict[str, Any], max_chars: int, max_bytes: int) -> None:
    """Cut texts to `max_chars`, then the largest ones until the row fits `max_bytes`."""
    truncated = False
    chars = 0
    for key, value in row.items():
        if type(value) in _SCALARS:
            continue
        if isinstance(value, str):
            if len(value) > max_chars:
                row[key] = _cut(key, value, max_chars)
                truncated = True
            chars += len(value)
        elif isinstance(value, list):
            chars += sum(map(len, value))
    # `row_size` is at most this (12 bytes a character, fixed overhead per value): when it
    # fits, the row fits, and the sizing pass is skipped.
    small = 64 + 56 * len(row) + 12 * chars + 4 * len(row.get("tags") or ()) <= max_bytes
    while (truncated or not small) and row_size(row) > max_bytes:
        key = max((k for k, v in row.items() if isinstance(v, str)), key=lambda k: len(row[k]))
        value = row[key]
        if len(value) < 200:  # nothing large left to cut; the rest is fixed overhead
            break
        row[key] = _cut(key, value, len(value) // 2)
        truncated = True
    row["is_truncated"] = truncated


def row_size(row: dict[str, Any]) -> int:
    """An upper bound of the row's JSON size on the wire, in bytes.

    insertAll bodies are sent with non-ASCII escaped, up to 12 bytes a character; ASCII
    text counts once. Cheap: `isascii` is a fast scan.
    """
    size = 64 + 32 * len(row)
    for value in row.values():
        if isinstance(value, str):
            size += (len(value) if value.isascii() else 12 * len(value)) - 8
        elif isinstance(value, list):
            size += sum(len(v) + 4 for v in value) - 8
    return size
