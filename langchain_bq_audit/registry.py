"""One writer per process and destination table, and the hooks that drain them all: at exit,
on SIGTERM (then the previous handler acts), and after `os.fork()` (the child starts empty).

`get_writer` is what handlers call; `flush_all` and `shutdown` are what the public
`langchain_bq_audit.flush()` and the notebook helper call.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from .settings import AuditSettings
from .writer import EXITING, Writer

logger = logging.getLogger(__name__)

_writers: dict[tuple[Any, ...], Writer] = {}
_registry_lock = threading.Lock()
_hooks_installed = False
_previous_sigterm: Any = None


def get_writer(settings: AuditSettings, client: Any = None) -> Writer:
    """The shared writer for `settings`' destination (and `client`, when one is given).

    With `writer_process` it runs in a child process, unless that cannot be: a `client`
    object or a redactor that cannot be pickled stays in this process (with a warning);
    left on auto (None), `auto_writer_process` decides.
    """
    key = (*settings.destination, id(client) if client is not None else None)
    writer = _writers.get(key)
    if writer is not None:
        ignored = writer.settings.delivery_differences(settings)
        if ignored:  # one writer per table: the first handler's delivery options hold
            writer._warn(
                "options:" + ",".join(ignored),
                f"langchain-bq-audit: {writer.destination} already has a writer; these options "
                f"of a later handler are ignored for it: {', '.join(ignored)}",
            )
        return writer
    with _registry_lock:
        writer = _writers.get(key)
        if writer is None:
            writer = _new_writer(settings, client)
            _writers[key] = writer
            if client is not None:
                # the key holds id(client): forget the writer's slot when the client dies
                weakref.finalize(client, _writers.pop, key, None)
            _install_hooks(settings)
    return writer


#: Modules of long-lived servers (ASGI/WSGI servers, LangGraph's API server): when one is
#: imported, the application serves calls for hours, not seconds.
SERVER_MODULES = ("uvicorn", "gunicorn", "hypercorn", "granian", "daphne", "waitress",
                  "langgraph_api")  # fmt: skip


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_writer_process(
    modules: Mapping[str, Any] | None = None, cpus: int | None = None
) -> str | None:
    """Why `writer_process=None` (auto) starts with the writer thread here, or None to use
    the writer process. The process pays off in a long-lived server with a CPU to spare: it
    takes the writer's CPU off the application's interpreter lock (the p99 and mean of
    quick calls, README Performance). A short script only pays for it (a second interpreter,
    about 0.5 s of CPU, and the drain at exit through the pipe). Elsewhere the thread hands
    over to a process once it is busy (`Writer._hand_over`), where `process_problem` allows.
    `modules`: `sys.modules`; `cpus`: `usable_cpus()`."""
    modules = sys.modules if modules is None else modules
    why = process_problem(modules, cpus)
    if why is None and not any(name in modules for name in SERVER_MODULES):
        why = f"not a long-lived server (none of {', '.join(SERVER_MODULES)} imported)"
    return why


def process_problem(
    modules: Mapping[str, Any] | None = None, cpus: int | None = None
) -> str | None:
    """Why a writer on auto must not use a writer process here, or None: a notebook
    restarts its kernel, with one CPU the child takes the application's, and some
    interpreters cannot start one (`writer_process.interpreter_problem`)."""
    modules = sys.modules if modules is None else modules
    if "ipykernel" in modules:
        return "a notebook"
    if (usable_cpus() if cpus is None else cpus) < 2:
        return "one CPU: a writer process would take the application's"
    from .writer_process import interpreter_problem

    return interpreter_problem()


def _new_writer(settings: AuditSettings, client: Any) -> Writer:
    if settings.writer_process is False:
        return Writer(settings, client)
    import pickle

    why = "a client object cannot be passed to another process" if client is not None else None
    if not why:
        try:
            pickle.dumps(settings)
        except Exception as exc:  # a lambda among the redactors, say
            why = f"its settings cannot be pickled ({exc!r})"
    if settings.writer_process is None:  # auto: the thread unless the process pays off
        if why:  # nothing could cross to a child: the thread for good
            logger.debug("langchain-bq-audit: writer thread (writer_process auto): %s", why)
            return Writer(settings.replace(writer_process=False), client)
        why = auto_writer_process()
        if why:  # the thread, handing over to a process once busy where one may run
            logger.debug("langchain-bq-audit: writer thread (writer_process auto): %s", why)
            return Writer(settings.replace(writer_process=False), client,
                          hand_over=process_problem() is None)  # fmt: skip
    elif why:
        logger.warning("langchain-bq-audit: writer_process is ignored: %s", why)
        return Writer(settings.replace(writer_process=False), client)
    from .writer_process import ProcessWriter

    return ProcessWriter(settings)


def all_writers() -> list[Writer]:
    """Every writer of this process."""
    return list(_writers.values())


def flush_all(timeout: float | None = 10.0) -> bool:
    """Flush every writer of this process within `timeout` seconds in total."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ok = True
    for writer in all_writers():
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ok = writer.flush(left) and ok
    return ok


def shutdown(timeout: float) -> bool:
    """Write what every writer holds within `timeout` seconds in total; spool the rest."""
    deadline = time.monotonic() + timeout
    ok = True
    for writer in all_writers():
        ok = writer.close(max(0.0, deadline - time.monotonic())) and ok
    return ok


def _drain_timeout() -> float:
    return max((w.settings.shutdown_timeout_s for w in all_writers()), default=0.0)


def _atexit_drain() -> None:
    EXITING.set()
    shutdown(_drain_timeout())


_sigterm_drain: threading.Thread | None = None  # the drain a SIGTERM started, once
_sigterm_drained = threading.Event()
_sigterm_more: list[int] = []  # SIGTERMs that came while a drain ran


def _on_sigterm(signum: int, frame: Any) -> None:
    """Drain in a thread of its own, then act on the signal as before us.

    The handler runs in the main thread between two of its bytecodes, maybe inside a lock
    that the writer's threads need (`submit`, `flush`): a drain waited for here could wait
    on that lock for good. So the first SIGTERM starts the drain and returns; the drain
    sends SIGTERM again when it is done (a real signal: a blocking call of the main thread
    is interrupted), and this handler then does what the previous one would have.
    """
    global _sigterm_drain
    if not _sigterm_drained.is_set():
        if _sigterm_drain is not None:
            _sigterm_more.append(signum)  # another while draining: handled after, in turn
            return
        EXITING.set()  # (a previous handler that keeps the process alive: views may come)
        # set before it starts: its signal back may be handled before `start` returns
        _sigterm_drain = threading.Thread(target=_drain_then_resignal, args=(signum,),
                                          name="bq-audit-sigterm-drain")  # fmt: skip
        try:
            _sigterm_drain.start()  # not a daemon: an ending interpreter waits for it
            return
        except RuntimeError:  # the interpreter is ending (no new threads): drain here
            shutdown(_drain_timeout())
    _sigterm_drain = None  # the process may go on (a handler of the app's): drain each time
    _sigterm_drained.clear()
    if _sigterm_more:  # as before us: each SIGTERM reaches the previous handler
        _sigterm_more.pop()
        os.kill(os.getpid(), signum)
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)  # SystemExit: the exit drain sets EXITING again
    elif previous != signal.SIG_IGN:  # the default action: die of SIGTERM, as without us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    EXITING.clear()  # the process goes on: a later close is the app's, not a drain's


def _drain_then_resignal(signum: int) -> None:
    try:
        shutdown(_drain_timeout())
    finally:
        _sigterm_drained.set()
        main = threading.main_thread().ident
        if hasattr(signal, "pthread_kill") and main is not None:
            signal.pthread_kill(main, signum)  # to the main thread: its blocking call wakes
        else:
            os.kill(os.getpid(), signum)


def _install_hooks(settings: AuditSettings) -> None:
    global _hooks_installed, _previous_sigterm
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_atexit_drain)
    # Signal handlers can only be set from the main thread; elsewhere atexit must do.
    if settings.handle_sigterm and threading.current_thread() is threading.main_thread():
        try:
            previous = signal.getsignal(signal.SIGTERM)
            if previous is not _on_sigterm:
                signal.signal(signal.SIGTERM, _on_sigterm)
                _previous_sigterm = previous
        except (ValueError, OSError):  # pragma: no cover - embedded interpreters
            pass


def _after_fork_in_child() -> None:
    # The child's copies of the parent's queued rows belong to the parent, which writes
    # them; the child starts empty, with threads of its own on first use.
    global _registry_lock, _sigterm_drain
    _registry_lock = threading.Lock()
    _sigterm_drain = None  # the parent's drain, if one ran, is not the child's
    _sigterm_drained.clear()
    _sigterm_more.clear()
    EXITING.clear()  # a new process, not ending because its parent is
    for writer in _writers.values():
        writer._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
