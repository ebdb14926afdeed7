"""Audit every LangChain run of a process without touching its code.

- `LANGCHAIN_BQ_AUDIT=true` (read on every LangChain configure call, so it can be set after
  import) or `enable(**options)` adds one process-wide `BigQueryAuditHandler` to every run,
  through `langchain_core.tracers.context.register_configure_hook`, registered once: when
  this module is imported, if LangChain has loaded that module, else the moment it does.
- A call made with `callbacks=[]` (and the runs inside it) is left alone.
- Importing this module costs about a millisecond (no LangChain, no Google), so the two ways
  to load it at interpreter start are cheap: `bq-audit run -- CMD` puts `_bootstrap/` (a
  `sitecustomize`) on `PYTHONPATH` for CMD and every Python process it starts, and
  `bq-audit install-hook` writes `PTH_NAME` into site-packages, whose one line imports this
  module only when `LANGCHAIN_BQ_AUDIT` is set (a dict lookup otherwise).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
from contextvars import ContextVar
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from .settings import TRUE_WORDS

if TYPE_CHECKING:
    from .handler import BigQueryAuditHandler

ENV_VAR = "LANGCHAIN_BQ_AUDIT"
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")
"""The folder `bq-audit run` puts first on `PYTHONPATH`: its `sitecustomize` imports this."""
PTH_NAME = "langchain_bq_audit_hook.pth"
PTH_LINE = (
    f"import os; os.environ.get({ENV_VAR!r}, '').strip().lower() in "
    f"{tuple(sorted(TRUE_WORDS))!r} and __import__('langchain_bq_audit.global_hook')\n"
)
"""The line `install-hook` writes: Python runs a .pth line that starts with `import`."""
logger = logging.getLogger(__name__)


class _GlobalHandler:
    """What LangChain's configure hook reads: it only ever calls `.get()`.

    A real ContextVar would hold a value per thread and per task; a global audit log has
    to reach every thread and event loop of the process, so this object stands in for one.
    """

    def __init__(self) -> None:
        self.handler: BigQueryAuditHandler | None = None
        self.state = "env"  # "env": follow LANGCHAIN_BQ_AUDIT; "on": enable(); "off": disable()
        self.lock = threading.Lock()
        self.env_error: str | None = None

    def get(self) -> BigQueryAuditHandler | None:
        if self.state == "on":
            handler = self.handler
        elif self.state == "off" or os.environ.get(ENV_VAR, "").strip().lower() not in TRUE_WORDS:
            return None
        else:
            handler = self.handler or self._from_env()
        if handler is not None and _opted_out(sys._getframe(1), handler):
            return None
        return handler

    def _from_env(self) -> BigQueryAuditHandler | None:
        with self.lock:
            if self.handler is None and self.env_error is None:
                from .handler import BigQueryAuditHandler

                try:
                    self.handler = BigQueryAuditHandler()  # settings from BQ_AUDIT_* variables
                except Exception as exc:  # bad settings must not break every chain: say it once
                    self.env_error = f"{type(exc).__name__}: {exc}"
                    logger.warning(
                        "langchain-bq-audit: %s is set but auditing is off: %s",
                        ENV_VAR, self.env_error,
                    )  # fmt: skip
            return self.handler


def _opted_out(frame: FrameType, handler: BigQueryAuditHandler) -> bool:
    """Whether the run LangChain is configuring asked for no callbacks.

    LangChain gives a configure hook no view of the call, so this reads the arguments of
    its caller, langchain-core's `_configure`: `callbacks=[]` on the call (an empty list,
    not None), or a run inside such a call (a callback manager with a parent run that does
    not hold `handler`). Any other caller, or other names there, attach as before.
    """
    if frame.f_code.co_name != "_configure":
        return False
    args = frame.f_locals
    inherited = args.get("inheritable_callbacks")
    if isinstance(inherited, list):
        return not inherited and not args.get("local_callbacks")
    if inherited is None or getattr(inherited, "parent_run_id", None) is None:
        return False
    return handler not in getattr(inherited, "handlers", (handler,))


_global = _GlobalHandler()
_TRACERS_CONTEXT = "langchain_core.tracers.context"


def _register() -> None:
    from langchain_core.tracers.context import register_configure_hook

    register_configure_hook(cast("ContextVar[Any]", _global), inheritable=True)


class _RegisterWhenImported:
    """Registers the hook right after LangChain imports `langchain_core.tracers.context`.

    A meta path finder needs only `find_spec` (not `importlib.abc`, which costs 8 ms).

    That module imports langsmith (about a second); LangChain imports it itself on the
    first run it configures, so waiting for that keeps `import langchain_bq_audit` fast.
    """

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TRACERS_CONTEXT:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if _TRACERS_CONTEXT in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterWhenImported())


def enable(**options: Any) -> BigQueryAuditHandler:
    """Audit every LangChain run in this process; returns the global handler.

    `options` are `BigQueryAuditHandler`'s arguments (`table=`, `client=`, `session_id=`,
    any `AuditSettings` field); the rest come from `BQ_AUDIT_*` variables. Calling it again
    replaces the global handler. Example::

        langchain_bq_audit.enable(app_name="support-bot")
        chain.invoke(question)              # audited, no callbacks= needed
    """
    from .handler import BigQueryAuditHandler

    handler = BigQueryAuditHandler(**options)
    with _global.lock:
        _global.handler = handler
        _global.state = "on"
    return handler


def disable() -> None:
    """Stop auditing runs globally (also overrides `LANGCHAIN_BQ_AUDIT`).

    Rows already accepted are still written; explicit handlers keep working.
    """
    with _global.lock:
        _global.handler = None
        _global.state = "off"


def global_handler() -> BigQueryAuditHandler | None:
    """The handler attached to every run (by `enable()` or the environment), or None."""
    return _global.get()


def chain_sitecustomize(bootstrap_dir: str) -> None:
    """Run the `sitecustomize` that the launcher's own one shadows on `sys.path`, if any."""
    here = os.path.realpath(bootstrap_dir)
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)
