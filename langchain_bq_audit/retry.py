"""How one destination's sender reacts to failure: the retry policy of a batch, the
up/down breaker that decides when BigQuery is taken as unreachable, and which errors are a
configuration problem rather than an outage.

- A batch is retried on `RetryableError` (connection lost, timeout, 5xx, 429) with full
  jitter backoff (`google.api_core.retry.exponential_sleep_generator`: 0.2 s doubling to
  5 s) until its deadline (`batch_deadline_s`).
- A `ConfigurationError` (no credentials, permission denied, unknown project) is not
  retried: the destination is marked down at once, with one warning naming the fix.
- While down, rows go to the spool, and a probe (one attempt with the spool's oldest rows,
  or with the next batch) runs every 1 s, backing off to 30 s, until BigQuery answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from .sinks.base import IAM_HINT, ConfigurationError

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 30.0

CREDENTIALS_HINT = (
    "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`, "
    "pass project= (or GOOGLE_CLOUD_PROJECT) and client=, or point emulator_host at a "
    "local BigQuery"
)


def backoff_delays() -> Iterator[float]:
    """Seconds to wait before each retry of a batch (full jitter, capped)."""
    from google.api_core.retry import exponential_sleep_generator

    return exponential_sleep_generator(BACKOFF_FIRST_S, BACKOFF_MAX_S, 2.0)  # type: ignore[no-any-return]


class Breaker:
    """Up or down, and when the next probe is due while down. Used by the sender thread only."""

    __slots__ = ("down", "next_probe", "probe_wait")

    def __init__(self) -> None:
        self.down = False
        self.probe_wait = PROBE_FIRST_S
        self.next_probe = 0.0

    def probe_due(self) -> bool:
        """True when up, or when down and the probe's time has come."""
        return not self.down or time.monotonic() >= self.next_probe

    def failed(self) -> bool:
        """Record a failure: down (again), next probe later. True when it just went down."""
        went_down = not self.down
        if went_down:
            self.down = True
            self.probe_wait = PROBE_FIRST_S
        else:
            self.probe_wait = min(self.probe_wait * 2, PROBE_MAX_S)
        self.next_probe = time.monotonic() + self.probe_wait
        return went_down

    def succeeded(self) -> None:
        """BigQuery answered: up, and probes start from the shortest wait next time."""
        self.down = False
        self.probe_wait = PROBE_FIRST_S
        self.next_probe = 0.0


def setup_error(exc: BaseException) -> ConfigurationError | None:
    """The configuration problem behind an exception from making the client, provisioning
    or writing, with a hint; None when it looks like an outage (connection lost, 5xx)."""
    if isinstance(exc, ConfigurationError):
        return exc
    name = type(exc).__name__
    module = type(exc).__module__
    text = f"{name}: {exc}"
    if module.startswith("google.auth") and name in ("DefaultCredentialsError", "RefreshError"):
        return ConfigurationError(
            f"no usable Google Cloud credentials ({text}); " + CREDENTIALS_HINT
        )
    if type(exc) is OSError and "project" in str(exc).lower():  # "Project was not passed..."
        return ConfigurationError(f"{text}; {CREDENTIALS_HINT}")
    # 400 is left out: a local BigQuery answers 400 to a conflict worth retrying
    code = getattr(exc, "code", None) if module.startswith("google.api_core") else None
    what = {401: "not authenticated", 403: "permission denied", 404: "project not found"}.get(
        code if isinstance(code, int) else 0
    )
    if what is not None:
        return ConfigurationError(f"{what} ({text}); {IAM_HINT}")
    return None
