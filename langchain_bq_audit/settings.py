"""One frozen settings object, built from arguments over `BQ_AUDIT_*` environment variables."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .context import SESSION_KEYS, USER_KEYS
from .schema import DEFAULT_DATASET, DEFAULT_LOCATION, DEFAULT_TABLE, DIGEST_TABLE_SUFFIX

ENV_PREFIX = "BQ_AUDIT_"
_CODE_ONLY = {"redactors"}  # not settable from the environment
_LABEL = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
SINKS = ("insert_all", "write_api")
CAPTURE_MODES = ("full", "redacted", "metadata")
RUN_TYPES = ("llm", "chat_model", "chain", "tool", "retriever")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})  # also what LANGCHAIN_BQ_AUDIT takes
_FALSE = {"0", "false", "no", "off", ""}
# Options of the one writer a destination table has per process: the first handler's win,
# and a later handler asking otherwise is warned about by name (`delivery_differences`).
# Every other option shapes rows and is each handler's own.
DELIVERY_OPTIONS = (
    "location", "sink", "write_api_host", "auto_create", "auto_create_views", "retention_days",
    "labels", "batch_rows", "batch_bytes", "batch_age_s", "max_queue_rows", "request_timeout_s",
    "batch_deadline_s", "shutdown_timeout_s", "max_buffer_bytes", "spool_enabled", "spool_dir",
    "max_spool_bytes", "handle_sigterm", "run_ttl_s", "max_pending_runs", "hash_chain",
    "writer_process",
)  # fmt: skip


@dataclass(frozen=True)
class AuditSettings:
    """Every option of the audit log. Each field `x` can be set with `BQ_AUDIT_X`."""

    project: str | None = None
    """Google Cloud project; None means the client's default (env, ADC or the emulator)."""
    dataset: str = DEFAULT_DATASET
    table: str = DEFAULT_TABLE
    location: str = DEFAULT_LOCATION
    emulator_host: str | None = None
    """Endpoint of a local BigQuery (e.g. 127.0.0.1:9050); also read from BIGQUERY_EMULATOR_HOST."""
    sink: str = "insert_all"
    """How rows are written: `insert_all` (streaming inserts, dedup by insertId) or
    `write_api` (Storage Write API, Arrow, `_default` stream; extra `write-api`)."""
    write_api_host: str | None = None
    """`host:port` of an emulator's Storage Write API (gRPC); needed with `emulator_host`."""
    auto_create: bool = True
    """Create the dataset and table before the writer's first write if they are missing, and
    add columns a table made by an older version lacks."""
    auto_create_views: bool = True
    """With `auto_create`, also create or update the views (`<table>_dedup`, `_sessions`, ...)
    once the first rows are written. Off: the views come from `bq-audit init` or Pulumi."""
    retention_days: int | None = None
    """Days a partition (a day of rows) is kept when the table is created; None: forever."""
    labels: str | None = None
    """Extra labels for the dataset and table, as `key=value,key=value`."""

    batch_rows: int = 500
    batch_bytes: int = 5_000_000
    batch_age_s: float = 1.0
    """A partial batch is sent at most this long after its rows were queued."""
    max_queue_rows: int = 100_000
    """Rows waiting in memory; beyond this new rows are counted as dropped."""
    request_timeout_s: float = 10.0
    """Timeout of each HTTP request to BigQuery."""
    batch_deadline_s: float = 30.0
    """Total time spent retrying one batch before it is given up."""
    shutdown_timeout_s: float = 5.0
    """How long the atexit drain may take."""

    max_buffer_bytes: int = 50_000_000
    """Built rows held in memory for sending; beyond this new rows go to the spool."""
    spool_enabled: bool = True
    """Keep rows that cannot be written now on local disk and replay them later."""
    spool_dir: str | None = None
    """Spool root; default `$XDG_CACHE_HOME/langchain-bq-audit/spool`."""
    max_spool_bytes: int = 1_000_000_000
    """Disk budget of one destination's spool; beyond it rows are dropped (and counted)."""
    handle_sigterm: bool = True
    """On SIGTERM, drain like at exit, then let the previous handler (or default) act."""

    max_field_chars: int = 200_000
    """Longest text kept in one column; longer text is cut and `is_truncated` set.
    (insertAll escapes non-ASCII as up to 6 bytes a character and caps requests at 10 MB.)"""
    max_row_bytes: int = 5_000_000
    """Budget for one whole row; the largest texts are cut until it fits (insertAll: 10 MB)."""
    capture_documents: bool = False
    """Keep retrieved documents' text in the row (ids and metadata are always kept)."""
    run_ttl_s: float = 3600.0
    """A run with no end after this long is written with status `abandoned`."""
    max_pending_runs: int = 100_000
    """Runs a handler tracks at once; beyond this new runs are not tracked (and counted)."""
    app_name: str | None = None
    environment: str | None = None

    # -- what is written: the volume (per handler; README "Shaping the volume") -------------
    run_types: tuple[str, ...] = ()
    """Write only runs of these types (llm, chat_model, chain, tool, retriever); empty: all.
    From the environment as a comma-separated list."""
    skip_names: tuple[str, ...] = ()
    """Do not write runs with these names (e.g. `ChatPromptTemplate,StrOutputParser`)."""
    user_visible: bool = False
    """Write only model, tool and retriever calls and each trace's root run: no inner steps."""
    sample_rate: float = 1.0
    """Share of traces written, 0 to 1: head sampling, decided once per trace from its id, so a
    trace is written whole or not at all. Runs that fail are always written. Each row holds
    the rate (1 on failed runs): `SUM(1 / sample_rate)` estimates the unsampled count."""

    # -- who: where session and user are named (README "What a row holds") ---------------
    session_keys: tuple[str, ...] = ()
    """Your keys naming a run's session (e.g. a `history_factory_config` field id), looked up
    before the built-in `session_id`, `thread_id`, `conversation_id`, which still apply; first
    present wins, in the run's metadata and then in its config's `configurable`."""
    user_keys: tuple[str, ...] = ()
    """The same for the user, before `user_id`, `user`."""

    capture_mode: str = "full"
    """full (text as it came, credentials removed), redacted (also e-mails, phones, cards
    and `redactors`), or metadata (no text: hashes and sizes only)."""
    redactors: tuple[Callable[[str], str], ...] = ()
    """Your own text -> text functions, run after the built-in ones (not in `full` mode)."""
    user_id_key: str | None = field(default=None, repr=False)
    """When set, `user_id` is written as HMAC-SHA256 under this key (pseudonymous)."""
    hash_chain: bool = True
    """Chain the rows of each writer with SHA-256 so `bq-audit verify` can find edits."""
    digest_key_file: str | None = None
    """Ed25519 private key (PEM, from `bq-audit keygen`): sign digests of each hash chain
    into `<table>_digests` (see digests.py; extra `signing`)."""
    digest_key: str | None = field(default=None, repr=False)
    """The same key as text (PEM, or base64 of its 32 bytes), e.g. from a secret manager."""
    digest_every_rows: int = 1000
    """A signed digest after this many rows of a chain..."""
    digest_every_s: float = 60.0
    """...or this many seconds after the first row it does not cover yet, and at close."""
    digest_file: str | None = None
    """Also append each digest to this local file (JSON lines), a copy outside BigQuery."""
    prices: Mapping[str, Mapping[str, Any]] | str | None = None
    """Your own prices, over genai-prices', for private or fine-tuned models: `{model_name:
    {"input": 3, "output": 15, "cache_read": 0.3, "cache_write": 3.75, "provider": "openai"}}`
    in USD per million tokens (JSON from the environment); `provider` is optional."""
    writer_process: bool | None = None
    """Build and send rows in a child process, off the application's GIL (True), in a
    thread of this process (False), or None (`auto`, also from the environment): the
    process for a long-lived server with a spare CPU; elsewhere the thread, which moves to
    a process once it has used 10% of a CPU over 5 s where one may run (see
    `registry.auto_writer_process`, `Writer._hand_over`)."""

    def __post_init__(self) -> None:
        for name, type_name in (
            ("writer_process", "bool | None"), ("user_visible", "bool"), ("sample_rate", "float"),
        ):  # fmt: skip
            value = getattr(self, name)  # "auto", "false", "0.5": as from the environment
            if isinstance(value, str):
                object.__setattr__(self, name, _parse(name, type_name, value, given=True))
        self._check_volume()
        if self.prices is not None:  # checked now: a bad price is a clear error here, not later
            from .cost import parse_prices

            object.__setattr__(self, "prices", parse_prices(self.prices))
        for name in (
            "batch_rows", "batch_bytes", "max_queue_rows", "max_field_chars", "max_row_bytes",
            "max_pending_runs", "max_buffer_bytes", "max_spool_bytes", "digest_every_rows",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("batch_age_s", "request_timeout_s", "batch_deadline_s", "run_ttl_s",
                     "digest_every_s"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.sink not in SINKS:
            raise ValueError(f"sink must be one of {', '.join(SINKS)}, got {self.sink!r}")
        if self.sink == "write_api" and self.emulator_host and not self.write_api_host:
            raise ValueError(
                "sink='write_api' with an emulator needs write_api_host, the emulator's gRPC "
                "host:port (LocalBigQuery.grpc_target, BQ_AUDIT_WRITE_API_HOST)"
            )
        if self.capture_mode not in CAPTURE_MODES:
            raise ValueError(
                f"capture_mode must be full, redacted or metadata, got {self.capture_mode!r}"
            )
        if not all(callable(r) for r in self.redactors):
            raise TypeError("redactors must be callables taking and returning a str")
        object.__setattr__(self, "redactors", tuple(self.redactors))  # a list is fine too
        if self.retention_days is not None and self.retention_days < 1:
            raise ValueError(f"retention_days must be at least 1, got {self.retention_days!r}")
        self.label_map  # noqa: B018 - validates the labels early, with a clear message
        if self.shutdown_timeout_s < 0:
            raise ValueError("shutdown_timeout_s must not be negative")
        for name in ("dataset", "table"):
            value = getattr(self, name)
            if not value or not value.replace("_", "").isalnum():
                raise ValueError(f"{name} must be letters, digits and underscores, got {value!r}")
        if self.digest_key and self.digest_key_file:
            raise ValueError("set one of digest_key and digest_key_file, not both")
        if self.signs_digests and not self.hash_chain:
            raise ValueError("digests sign the hash chain: a digest key needs hash_chain=true")

    def _check_volume(self) -> None:
        for name in ("run_types", "skip_names", "session_keys", "user_keys"):  # "a,b" too
            value = getattr(self, name)
            if not isinstance(value, (str, tuple, list)):
                raise ValueError(f"{name} must be names, as a list or 'a,b', got {value!r}")
            items = value.split(",") if isinstance(value, str) else value
            object.__setattr__(self, name, tuple(str(v).strip() for v in items if str(v).strip()))
        for name, builtin in (("session_keys", SESSION_KEYS), ("user_keys", USER_KEYS)):
            keys = getattr(self, name)
            if not all(key.replace("-", "_").isidentifier() for key in keys):
                raise ValueError(f"{name}: keys are names like chat_id, got {keys!r}")
            # yours first, then the built-in ones (each once): adding a key never loses them
            object.__setattr__(self, name, tuple(dict.fromkeys((*keys, *builtin))))
        unknown = sorted(set(self.run_types) - set(RUN_TYPES))
        if unknown:
            raise ValueError(
                f"run_types: unknown run type(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(RUN_TYPES)}"
            )
        if not isinstance(self.sample_rate, (int, float)) or isinstance(self.sample_rate, bool):
            raise ValueError(f"sample_rate must be a number, got {self.sample_rate!r}")
        if not 0.0 <= self.sample_rate <= 1.0:  # NaN fails too
            raise ValueError(f"sample_rate must be between 0 and 1, got {self.sample_rate!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> AuditSettings:
        """Settings from `BQ_AUDIT_*` variables, with `overrides` (not None) taking precedence."""
        env = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise TypeError(
                f"unknown audit setting(s): {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for name, f in known.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and name not in _CODE_ONLY:
                values[name] = _parse(name, str(f.type), raw)
        if "emulator_host" not in values and env.get("BIGQUERY_EMULATOR_HOST"):
            values["emulator_host"] = env["BIGQUERY_EMULATOR_HOST"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> AuditSettings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def delivery_differences(self, other: AuditSettings) -> list[str]:
        """`name=mine (not other's)` for each delivery option where `other` differs."""
        return [
            f"{name}={getattr(other, name)!r} (is {getattr(self, name)!r})"
            for name in DELIVERY_OPTIONS
            if getattr(self, name) != getattr(other, name)
            # writer_process None (auto) asks for nothing: the first handler's choice stands
            and not (name == "writer_process" and getattr(other, name) is None)
        ]

    @property
    def price_overrides(self) -> Mapping[str, Mapping[str, Any]]:
        """`prices` as checked by `cost.parse_prices`; empty when not set."""
        return self.prices if isinstance(self.prices, Mapping) else {}

    @property
    def signs_digests(self) -> bool:
        """True when a digest key is set: the writer signs digests of its chain."""
        return bool(self.digest_key or self.digest_key_file)

    @property
    def digest_table(self) -> str:
        """The digests table's name: the audit table's, plus `_digests`."""
        return self.table + DIGEST_TABLE_SUFFIX

    @property
    def destination(self) -> tuple[str | None, str, str, str | None]:
        """What identifies one writer: project, dataset, table and endpoint."""
        return (self.project, self.dataset, self.table, self.emulator_endpoint)

    @property
    def label_map(self) -> dict[str, str]:
        """`labels` as a dict; keys and values as BigQuery allows them."""
        out: dict[str, str] = {}
        for item in (self.labels or "").split(","):
            if not item.strip():
                continue
            key, sep, value = item.strip().partition("=")
            if not sep or not _LABEL.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
                raise ValueError(
                    f"labels: {item.strip()!r} is not key=value with lowercase letters, digits, "
                    "'_' and '-' (a key starts with a letter), at most 63 characters each"
                )
            out[key] = value
        return out

    @property
    def emulator_endpoint(self) -> str | None:
        """`emulator_host` as a URL (`http://` added when missing)."""
        host = self.emulator_host
        if not host:
            return None
        return host if "://" in host else f"http://{host}"


def _parse(name: str, type_name: str, raw: str, given: bool = False) -> Any:
    """`raw` (from `BQ_AUDIT_<NAME>`, or with `given` an argument) as `type_name`."""
    var = name if given else ENV_PREFIX + name.upper()
    if not raw.strip() and "None" in type_name:
        return None
    try:
        if type_name.startswith("bool"):
            lowered = raw.strip().lower()
            if lowered == "auto" and "None" in type_name:  # None: the library decides
                return None
            if lowered in TRUE_WORDS:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("expected true/false" + (" or auto" if "None" in type_name else ""))
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if type_name.startswith("tuple[str"):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
    except ValueError as exc:
        raise ValueError(f"{var}={raw!r} is not valid: {exc}") from None
    return raw or None
