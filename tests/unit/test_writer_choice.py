"""Which writer a handler gets when `writer_process` is left on auto: the rule, and the
setting's spellings. No emulator: the writers here are made, never given rows."""

from __future__ import annotations

import sys
import types

import pytest

from langchain_bq_audit.registry import SERVER_MODULES, _new_writer, auto_writer_process
from langchain_bq_audit.settings import AuditSettings
from langchain_bq_audit.writer_process import ProcessWriter


@pytest.mark.parametrize("server", SERVER_MODULES)
def test_a_long_lived_server_with_a_spare_cpu_gets_the_writer_process(server: str) -> None:
    assert auto_writer_process({server: object(), "sys": sys}, cpus=2) is None


@pytest.mark.parametrize(
    ("modules", "cpus", "reason"),
    [
        ({"sys": sys}, 8, "not a long-lived server"),  # a script, a test run, a batch job
        ({"uvicorn": object()}, 1, "one CPU"),
        ({"uvicorn": object(), "ipykernel": object()}, 8, "a notebook"),
    ],
)
def test_elsewhere_auto_keeps_the_writer_thread(
    modules: dict[str, object], cpus: int, reason: str
) -> None:
    why = auto_writer_process(modules, cpus=cpus)
    assert why is not None and reason in why


def test_a_frozen_app_keeps_the_writer_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    why = auto_writer_process({"gunicorn": object()}, cpus=4)
    assert why is not None and "not a Python interpreter" in why


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, None), ("auto", None), ("AUTO", None), ("true", True), ("0", False), (True, True)],
)
def test_the_setting_is_auto_by_default_and_takes_its_spellings(
    given: object, expected: bool | None
) -> None:
    settings = AuditSettings() if given is None else AuditSettings(writer_process=given)  # type: ignore[arg-type]
    assert settings.writer_process is expected
    env = {} if given is None else {"BQ_AUDIT_WRITER_PROCESS": str(given)}
    assert AuditSettings.from_env(env).writer_process is expected


def test_a_bad_spelling_is_a_clear_error_naming_where_it_came_from() -> None:
    with pytest.raises(ValueError, match=r"^writer_process='sometimes' is not valid"):
        AuditSettings(writer_process="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^BQ_AUDIT_WRITER_PROCESS='sometimes' is not valid"):
        AuditSettings.from_env({"BQ_AUDIT_WRITER_PROCESS": "sometimes"})


def test_auto_picks_the_writer_by_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry follows the rule: the thread in this test process (no server imported),
    the process once a server module is imported, the thread again with a client object."""
    settings = AuditSettings(emulator_host="127.0.0.1:9", spool_enabled=False,
                             handle_sigterm=False)  # fmt: skip
    thread = _new_writer(settings, None)
    assert not isinstance(thread, ProcessWriter)
    assert thread.settings.writer_process is False
    assert thread._busy is not None  # which hands over to a process once busy
    monkeypatch.setitem(sys.modules, "uvicorn", types.ModuleType("uvicorn"))
    monkeypatch.setattr("langchain_bq_audit.registry.usable_cpus", lambda: 2)
    process = _new_writer(settings, None)
    assert isinstance(process, ProcessWriter)
    with_client = _new_writer(settings, object())
    assert not isinstance(with_client, ProcessWriter)
    assert with_client._busy is None  # a client object cannot cross: the thread for good
    monkeypatch.delitem(sys.modules, "uvicorn")
    monkeypatch.setattr("langchain_bq_audit.registry.usable_cpus", lambda: 1)
    one_cpu = _new_writer(settings, None)
    assert not isinstance(one_cpu, ProcessWriter) and one_cpu._busy is None
    forced = _new_writer(settings.replace(writer_process=False), None)
    assert forced._busy is None  # asked for the thread: no hand-over
    for writer in (thread, process, with_client, one_cpu, forced):
        writer.close(1)


def test_a_later_handler_asking_auto_is_not_warned_about() -> None:
    """auto (None) asks for nothing: whatever the first handler's writer became stands."""
    first = AuditSettings(writer_process=False)  # as auto resolved it in the registry
    assert first.delivery_differences(AuditSettings()) == []
    assert first.delivery_differences(AuditSettings(writer_process=True)) == [
        "writer_process=True (is False)"
    ]
