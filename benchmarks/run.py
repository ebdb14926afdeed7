"""Side-by-side benchmarks of langchain-bq-audit; every ratio is measured in this one run.

    .venv/bin/python -m benchmarks.run            # about 8 minutes on 2 cores
    .venv/bin/python -m benchmarks.run --calls 1000000   # the full memory run

Sections: import cost, hot path (invoke and ainvoke, small and 20 x 2 KB messages, a no-op
`run_inline` handler as the baseline, the audit handler by default (`writer_process` auto)
and with `writer_process=True`, interleaved rounds in rotated order), row building alone
(no network), insertAll and Storage Write API throughput from submit to committed rows
(batch sizes swept), and memory over many calls. It starts its own embedded BigQuery.
`--only rows,sinks` runs some sections (import, otel, hot, sustained, pauses, short, dispatch,
floor, rows, sinks, memory; `sustained`: blocks of quick calls for `--sustained-s` seconds,
the writer thread against the writer process, which the default moves to when busy;
`short`: what the writer process costs a script of 10 calls, start to exit, against the
writer thread; `otel`: the cost of reading the current OpenTelemetry span at a run's start;
`pauses`: the longest stall the writer causes, a tight loop of quick calls with each of those
handlers against a no-op, p50/p99/max per call and the full garbage collections that ran
(`--gc-freeze`: the loops after `gc.freeze()`); then the same loop while the writer
builds the rows of one call holding `--pause-mb` MB of text to redact, and with
`--against TREE` that variant also with another checkout's package, e.g. a git worktree of
main, in child processes alternately);
`floor` is the no-op chain with the emulator's CPU idle and busy: what work on the other CPU
costs the measured one on this machine; `dispatch` is how LangChain calls the handler in
async code (inline, through its thread pool, or awaited in the loop: see handler._no_hop).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableConfig

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.emulator import LocalBigQuery
from langchain_bq_audit.integrity import HashChain
from langchain_bq_audit.records import RunRecord
from langchain_bq_audit.rows import build_row
from langchain_bq_audit.settings import AuditSettings
from langchain_bq_audit.writer import Writer
from langchain_bq_audit.writer_process import ProcessWriter


class Noop(BaseCallbackHandler):
    """The baseline: a handler LangChain calls inline that does nothing."""

    run_inline = True


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def settle(handler: Any, timeout: float = 300) -> None:
    """Wait until every accepted row is written. Rows the writer spooled because its memory
    buffer was full (by design: the callback never waits) count once they are replayed."""
    deadline = time.monotonic() + timeout
    handler.flush(timeout)
    while time.monotonic() < deadline:
        stats = handler.stats()
        if stats["queued"] == 0 and stats["spool_bytes"] == 0:
            break
        time.sleep(0.1)
    stats = handler.stats()
    assert stats["written"] + stats["spooled"] == stats["accepted"], stats
    assert stats["replayed"] == stats["spooled"], stats
    assert stats["dropped"] == stats["dead_lettered"] == 0, stats


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def import_cost(runs: int = 11) -> list[tuple[str, str]]:
    """Milliseconds to import, each in a new interpreter: alone, and what an app pays, which
    has `langchain_core.callbacks` (and so the stdlib modules both use) loaded already."""
    code = "import time{pre}; t = time.perf_counter(); import {m}; print(time.perf_counter() - t)"
    # With bytecode, as a user has it: pip compiles a wheel's modules when it installs them,
    # but a source checkout under PYTHONDONTWRITEBYTECODE would compile ours on every run.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="bq-audit-bench-pyc-")

    def once(module: str, pre: str = "") -> float:
        argv = [sys.executable, "-c", code.format(m=module, pre=pre)]
        return float(subprocess.run(argv, env=env, capture_output=True, text=True,
                                    check=True).stdout) * 1000  # fmt: skip

    cases = {
        "core": ("langchain_core.callbacks", ""),
        "alone": ("langchain_bq_audit", ""),
        "in an app": ("langchain_bq_audit", ", langchain_core.callbacks"),
    }
    times: dict[str, list[float]] = {case: [] for case in cases}
    for module, pre in cases.values():
        once(module, pre)  # writes the bytecode
    for _ in range(runs):  # alternate, so that drift hits all alike
        for case, (module, pre) in cases.items():
            times[case].append(once(module, pre))
    core, alone, in_app = (statistics.median(times[c]) for c in cases)
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys, langchain_bq_audit; print('google.cloud' in "
         "sys.modules, 'genai_prices' in sys.modules)"], capture_output=True, text=True,
        check=True).stdout.strip()  # fmt: skip
    return [
        ("import langchain_core.callbacks", f"{core:.1f} ms"),
        ("import langchain_bq_audit, alone", f"{alone:.1f} ms"),
        (
            "import langchain_bq_audit, after langchain_core.callbacks",
            f"+{in_app:.1f} ms (target <= +30)",
        ),
        ("google.cloud, genai_prices imported at import", lazy),
    ]


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` on `cpus` (threads and processes it starts later inherit it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def pin_apart(emulator_pid: int) -> str:
    """The emulator on the last CPU, this process on the others: in production BigQuery's
    work happens elsewhere, so here it must not take CPU time from the measured calls."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return "not pinned (one CPU): the emulator shares it with the benchmark"
    pin(emulator_pid, set(cpus[-1:]))
    pin(os.getpid(), set(cpus[:-1]))
    return f"emulator on CPU {cpus[-1]}, benchmark on CPU {','.join(map(str, cpus[:-1]))}"


def chains(wait_s: float | None = None) -> dict[str, tuple[Any, dict[str, Any]]]:
    """`prompt | fake chat model | parser`, small and with 20 messages of 2 KB.

    `wait_s`: the model sleeps that long, as a real one waits on the network.
    """
    model = FakeListChatModel(responses=["ok"], sleep=wait_s)
    small = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    history = [HumanMessage("x" * 2048) if i % 2 else AIMessage("y" * 2048) for i in range(19)]
    big_prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"),
                                                   ("human", "{q}")])  # fmt: skip
    return {
        "small": (small, {"q": "hi"}),
        "20 x 2 KB": (big_prompt | model | StrOutputParser(), {"q": "z" * 2048,
                                                              "history": history}),
    }  # fmt: skip


def timed_calls(chain: Any, inputs: Any, handler: Any, count: int, mode: str) -> list[float]:
    """Seconds of each of `count` calls, one after another (`ainvoke`, `astream`: in one event
    loop; `astream` reads every chunk)."""
    cfg: RunnableConfig = {"callbacks": [handler]}
    if mode == "invoke":
        out = []
        for _ in range(count):
            start = time.perf_counter()
            chain.invoke(inputs, config=cfg)
            out.append(time.perf_counter() - start)
        return out

    async def calls() -> list[float]:
        out = []
        for _ in range(count):
            start = time.perf_counter()
            if mode == "astream":
                async for _ in chain.astream(inputs, config=cfg):
                    pass
            else:
                await chain.ainvoke(inputs, config=cfg)
            out.append(time.perf_counter() - start)
        return out

    return asyncio.run(calls())


def ratios(a: list[float], n: list[float]) -> str:
    return (f"p50 {pct(a, .5) * 1e6:.0f} us p99 {pct(a, .99) * 1e6:.0f} us | ratio p50 "
            f"{pct(a, .5) / pct(n, .5):.2f}x p99 {pct(a, .99) / pct(n, .99):.2f}x "
            f"mean {statistics.mean(a) / statistics.mean(n):.2f}x")  # fmt: skip


BUSY = """
import hashlib, json, os, sys
os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
messages = [{"role": "user", "content": "x" * 2048} for _ in range(20)]
while True:  # what a writer does: JSON and SHA-256 over 40 KB
    text = json.dumps(messages)
    hashlib.sha256(text.encode()).hexdigest()
    json.loads(text)
"""


def noise_floor(bq: LocalBigQuery, rounds: int, per_round: int) -> list[tuple[str, str]]:
    """The no-op chain with the emulator's CPU idle, and busy with a writer's kind of work.

    The other CPU is not free on every machine (shared caches and memory bandwidth, or
    hyperthreads of one core on a VM): this is how much work there slows the measured CPU.
    """
    cpus = ",".join(map(str, os.sched_getaffinity(bq.pid))) if bq.pid else "0"
    noop = Noop()
    out = []
    for label, (chain, inputs) in chains().items():
        for mode in ("invoke", "ainvoke"):
            idle: list[float] = []
            busy: list[float] = []
            timed_calls(chain, inputs, noop, per_round // 4, mode)
            for _ in range(rounds):
                idle += timed_calls(chain, inputs, noop, per_round, mode)
                burner = subprocess.Popen([sys.executable, "-c", BUSY, cpus])
                time.sleep(0.2)
                busy += timed_calls(chain, inputs, noop, per_round, mode)
                burner.kill()
                burner.wait()
            out.append((f"{mode} {label}, no-op, other CPU busy", ratios(busy, idle)))
    return out


def pin_writer_process(bq: LocalBigQuery, writer: Any) -> None:
    """The writer process on the emulator's CPU: on a machine with cores to spare it runs on
    one the application is not using (it would inherit this process's CPU otherwise)."""
    pid = writer.stats()["writer_process"]
    assert pid is not None, writer.stats()
    if bq.pid is not None and hasattr(os, "sched_getaffinity"):
        pin(pid, os.sched_getaffinity(bq.pid))


def writer_process_handler(bq: LocalBigQuery, table: str) -> BigQueryAuditHandler:
    """A handler with `writer_process=True`, its child pinned as above."""
    handler = BigQueryAuditHandler(table=table, emulator_host=bq.endpoint, project=bq.project,
                                   writer_process=True)  # fmt: skip
    pin_writer_process(bq, handler)
    return handler


def audit_handlers(bq: LocalBigQuery, table: str) -> dict[str, BigQueryAuditHandler]:
    """The audit handler two ways, each with a table (and so a writer) of its own: the
    default (`writer_process` auto: in a script, the writer thread until it is busy, then a
    writer process where the process may use 2 CPUs; this benchmark pins itself to one, so
    the thread throughout, as in a notebook or with a client object), and
    `writer_process=True` (its child pinned beside the emulator: a spare CPU)."""
    return {
        "default (auto)": BigQueryAuditHandler(table=f"{table}_auto", emulator_host=bq.endpoint,
                                               project=bq.project),
        "writer process": writer_process_handler(bq, f"{table}_process"),
    }  # fmt: skip


def moved(handler: BigQueryAuditHandler) -> bool:
    """Whether a writer on auto has handed over to a writer process."""
    return handler.stats()["writer_process"] is not None


def rotated_blocks(
    handlers: dict[str, Any],
    audits: dict[str, Any],
    rounds: int,
    block: Callable[[Any], list[float]],
    warm: Callable[[Any], object],
) -> tuple[dict[str, list[list[float]]], dict[str, list[tuple[int, float]]]]:
    """Each handler warmed up (`warm`) and the audit handlers settled before the first
    round; then `rounds` rounds of one `block` of calls per handler (its seconds per call),
    the order rotated every round so drift hits each alike. After each audit block, its
    backlog: the runs still queued as it ended, and the seconds its drain took (timed, so
    work left for later is reported, not hidden). (blocks by handler, backlogs by audit)"""
    for handler in handlers.values():
        warm(handler)
    for handler in audits.values():
        settle(handler)
    times: dict[str, list[list[float]]] = {name: [] for name in handlers}
    backlog: dict[str, list[tuple[int, float]]] = {name: [] for name in audits}
    names = list(handlers)
    for round_ in range(rounds):
        turn = round_ % len(names)
        for name in names[turn:] + names[:turn]:
            times[name].append(block(handlers[name]))
            if name in audits:
                queued = audits[name].stats()["queued"]
                start = time.perf_counter()
                settle(audits[name])
                backlog[name].append((queued, time.perf_counter() - start))
    return times, backlog


def hot_path(bq: LocalBigQuery, rounds: int, per_round: int) -> list[tuple[str, str]]:
    """`audit_handlers` against a no-op, round by round, the order of the variants rotated
    every round."""
    audits = audit_handlers(bq, "bench_hot_path")
    handlers: dict[str, Any] = {"no-op": Noop(), **audits}
    default = audits["default (auto)"]
    moved_at: str | None = None
    cases = [(label, chain, inputs, per_round) for label, (chain, inputs) in chains().items()]
    cases += [(f"{label}, model waits 5 ms", chain, inputs, per_round // 4)
              for label, (chain, inputs) in chains(0.005).items()]  # fmt: skip
    out = []
    for label, chain, inputs, count in cases:
        for mode in ("invoke", "ainvoke"):
            # each block's drain is outside its calls' times (the pauses section reports
            # it): rows still being built would otherwise slow the next variant's block
            blocks, _ = rotated_blocks(
                handlers, audits, rounds,
                partial(timed_calls, chain, inputs, count=count, mode=mode),
                partial(timed_calls, chain, inputs, count=count // 4, mode=mode),
            )  # fmt: skip
            times = {name: [t for b in bs for t in b] for name, bs in blocks.items()}
            n = times["no-op"]
            out.append((f"{mode} {label}", f"no-op p50 {pct(n, .5) * 1e6:.0f} us "
                                           f"p99 {pct(n, .99) * 1e6:.0f} us"))  # fmt: skip
            for name in audits:
                out.append((f"  audit, {name}", ratios(times[name], n)))
            if moved_at is None and moved(default):
                moved_at = f"{mode} {label}"
    out.append(
        ("  default (auto) became a writer process", f"during {moved_at}" if moved_at else "never")
    )
    for handler in audits.values():
        settle(handler)
        handler.close()
    return out


class FullCollections:
    """CPython's full (generation 2) garbage collections while a block of calls runs, by
    handler: (count, longest in seconds), timed with `gc.callbacks`."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[float]] = {}
        self._name: str | None = None
        self._started = 0.0
        self._gen = -1

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started, self._gen = time.perf_counter(), info["generation"]
        elif self._gen == 2 and self._name is not None:
            self.by_name[self._name].append(time.perf_counter() - self._started)

    def block(self, name: str, run: Callable[[], list[float]]) -> list[float]:
        self._name = name
        self.by_name.setdefault(name, [])
        gc.callbacks.append(self)
        try:
            return run()
        finally:
            gc.callbacks.remove(self)
            self._name = None

    def line(self, name: str) -> str:
        took = self.by_name.get(name) or []
        return f"{len(took)}" + (f", longest {max(took) * 1e3:.1f} ms" if took else "")


def pauses(
    bq: LocalBigQuery, rounds: int, calls: int, freeze: bool = False
) -> list[tuple[str, str]]:
    """The stalls the writer causes in the application: a tight loop of `calls` quick calls
    (`prompt | fake chat model | parser`, four rows each) with each of `audit_handlers`
    against a no-op, blocks in turn, the order rotated every round.

    The writer builds rows (or, with the writer process, pickles runs) while the loop runs,
    under the loop's interpreter lock: its longest step shows as the loop's p99 and max. The
    backlog a block leaves (runs still queued as it ends) is reported with the time it took
    to drain, not hidden, and so are the full garbage collections that ran during the
    blocks (each walks the whole heap while every thread waits). `freeze`: the loops run
    after `gc.freeze()`, as an app may call once it has started, so that full collections
    leave out what was loaded before (undone with `gc.unfreeze()` at the end).
    """
    audits: dict[str, Any] = {
        f"audit, {name}": handler for name, handler in audit_handlers(bq, "bench_pauses").items()
    }
    handlers: dict[str, Any] = {"no-op": Noop(), **audits}
    names = {id(h): name for name, h in handlers.items()}
    chain, inputs = chains()["small"]
    out = []
    if freeze:
        gc.collect()
        gc.freeze()
    for mode in ("invoke", "ainvoke"):
        full = FullCollections()

        def block(handler: Any, mode: str = mode, full: FullCollections = full) -> list[float]:
            run = partial(timed_calls, chain, inputs, handler, calls, mode)
            return full.block(names[id(handler)], run)

        blocks, backlog = rotated_blocks(
            handlers, audits, rounds, block,
            partial(timed_calls, chain, inputs, count=calls // 4, mode=mode),
        )  # fmt: skip
        times = {name: [t for b in bs for t in b] for name, bs in blocks.items()}
        n = times["no-op"]

        def line(values: list[float]) -> str:
            return (f"p50 {pct(values, .5) * 1e6:.0f} us p99 {pct(values, .99) * 1e6:.0f} us "
                    f"max {max(values) * 1e3:.1f} ms")  # fmt: skip

        title = f"{mode} tight loop, {rounds} x {calls} calls" + (", gc.freeze()" if freeze else "")
        out.append((f"{title}, no-op", line(n)))
        out.append(("    full garbage collections", full.line("no-op")))
        for name in audits:
            a = times[name]
            mean = statistics.mean(a) / statistics.mean(n)
            out.append((f"  {name}", line(a)))
            out.append(("    ratio audit / no-op",
                        f"p50 {pct(a, .5) / pct(n, .5):.2f}x p99 {pct(a, .99) / pct(n, .99):.2f}x "
                        f"max {max(a) / max(n):.2f}x mean {mean:.2f}x"))  # fmt: skip
            out.append(("    backlog at block end", ", ".join(
                f"{q} runs ({s:.2f} s to drain)" for q, s in backlog[name])))  # fmt: skip
            out.append(("    full garbage collections", full.line(name)))
    default = audits["audit, default (auto)"]
    out.append(("  default (auto)", "a writer process by the end" if moved(default)
                else "the writer thread throughout"))  # fmt: skip
    for audit in audits.values():
        audit.close()
    if freeze:
        gc.unfreeze()
    return out


def sustained(bq: LocalBigQuery, rounds: int, seconds: float) -> list[tuple[str, str]]:
    """A batch job: quick calls (`invoke`, small prompt) without a pause for `seconds` per
    block, with a no-op and `audit_handlers`, blocks in turn, the order rotated every round.
    With a second CPU the default is the writer thread for about 5 s, then a writer process
    (`Writer._hand_over`); pinned to one here, it shows the thread. Ratios of the whole
    block and of its last half; the backlog each block leaves, drained timed.
    """
    audits = audit_handlers(bq, "bench_sustained")
    handlers: dict[str, Any] = {"no-op": Noop(), **audits}
    chain, inputs = chains()["small"]

    def block(handler: Any) -> list[float]:
        cfg: RunnableConfig = {"callbacks": [handler]}
        out: list[float] = []
        end = time.perf_counter() + seconds
        while (start := time.perf_counter()) < end:
            chain.invoke(inputs, config=cfg)
            out.append(time.perf_counter() - start)
        return out

    times, backlog = rotated_blocks(
        handlers, audits, rounds, block, partial(timed_calls, chain, inputs, count=100,
                                                 mode="invoke"),
    )  # fmt: skip
    out = [(f"sustained invoke small, {rounds} x {seconds:.0f} s blocks",
            "calls per block: " + ", ".join(f"{name} {statistics.mean(map(len, b)):,.0f}"
                                             for name, b in times.items()))]  # fmt: skip
    for i in range(rounds):
        n = times["no-op"][i]
        for name in audits:
            a = times[name][i]
            half = ratios(a[len(a) // 2 :], n[len(n) // 2 :])
            out.append((f"  round {i + 1}, {name}", f"whole block: {ratios(a, n)}"))
            queued, drain = backlog[name][i]
            out.append(("    its last half", f"{half}; backlog {queued} runs ({drain:.2f} s)"))
    for handler in audits.values():
        handler.close()
    return out


def large_text(chars: int) -> str:
    """About `chars` characters of prose with e-mail addresses, phone numbers and keys in
    it (one word in 200 is one), the same text on every call."""
    import random

    rng = random.Random(1)
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "elit", "sed", "do", "tempor"]
    out: list[str] = []
    size = 0
    while size < chars:
        pick = rng.random()
        if pick < 0.002:
            word = f"user{rng.randint(1, 999)}@example.com"
        elif pick < 0.003:
            word = "sk-" + "A" * 30
        elif pick < 0.004:
            word = "+1 415 555 0123"
        elif pick < 0.005:
            word = "api_key=abcdef123456"
        else:
            word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def large_pauses(
    endpoint: str, project: str, rounds: int, megabytes: float
) -> dict[str, list[float]]:
    """What a tight loop of quick calls (the small chain, a no-op handler) sees while the
    writer thread builds the rows of one call whose prompt holds `megabytes` MB of text to
    redact (`capture_mode="redacted"`): per round, a *busy* block (that call, then quick
    calls until the writer has no row queued) and a *quiet* block of as many calls without
    it, the order rotated every round. Seconds per call, by block kind."""
    audit = BigQueryAuditHandler(table="bench_pauses_large", emulator_host=endpoint,
                                 project=project, capture_mode="redacted")  # fmt: skip
    quick, quick_inputs = chains()["small"]
    model = FakeListChatModel(responses=["noted, write to ops@example.com"])
    big = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    text = large_text(int(megabytes * 1_000_000))
    noop_cfg: RunnableConfig = {"callbacks": [Noop()]}
    times: dict[str, list[float]] = {"quiet": [], "busy": [], "build_s": []}
    timed_calls(quick, quick_inputs, Noop(), 200, "invoke")  # warm up
    big.invoke({"q": "warm up"}, config={"callbacks": [audit]})
    settle(audit)
    calls = 0
    for round_ in range(rounds):
        for kind in ("busy", "quiet") if round_ % 2 == 0 else ("quiet", "busy"):
            out = times[kind]
            if kind == "quiet":
                out += timed_calls(quick, quick_inputs, Noop(), max(calls, 2000), "invoke")
                continue
            start = time.perf_counter()
            big.invoke({"q": text}, config={"callbacks": [audit]})
            done = 0
            while True:  # until the writer has built and sent the big call's rows
                for _ in range(100):
                    begin = time.perf_counter()
                    quick.invoke(quick_inputs, config=noop_cfg)
                    out.append(time.perf_counter() - begin)
                done += 100
                if audit.stats()["queued"] == 0:
                    break
            times["build_s"].append(time.perf_counter() - start)
            calls = max(calls, done)
            settle(audit)
    audit.close()
    return times


_LARGE_CHILD = """
import importlib.util, json, sys
import langchain_bq_audit
assert langchain_bq_audit.__file__.startswith(sys.argv[2]), langchain_bq_audit.__file__
spec = importlib.util.spec_from_file_location("bench_run", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.large_pauses(sys.argv[3], sys.argv[4], 1, float(sys.argv[5]))))
"""


def _pause_line(values: list[float]) -> str:
    return (f"p50 {pct(values, .5) * 1e6:.0f} us p99 {pct(values, .99) * 1e3:.1f} ms "
            f"max {max(values) * 1e3:.1f} ms")  # fmt: skip


def large_pauses_report(
    bq: LocalBigQuery, rounds: int, megabytes: float, against: str | None
) -> list[tuple[str, str]]:
    """`large_pauses` here, or with `against` (a checkout of another version, e.g. a git
    worktree of main) in child processes, that package and this one alternately, one round
    each at a time, so that both see the same load."""
    label = f"tight loop while the writer builds a {megabytes:g} MB prompt's rows (redacted)"
    if against is None:
        got = {"this tree": large_pauses(bq.endpoint, bq.project, rounds, megabytes)}
    else:
        import json

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        trees = {"baseline": os.path.abspath(against), "this tree": here}
        got = {name: {"quiet": [], "busy": [], "build_s": []} for name in trees}
        for round_ in range(rounds):
            order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
            for name in order:
                # that tree's package; this file's benchmark, loaded by path in both
                env = dict(os.environ, PYTHONPATH=trees[name])
                argv = [sys.executable, "-c", _LARGE_CHILD, os.path.abspath(__file__),
                        trees[name], bq.endpoint, bq.project, str(megabytes)]  # fmt: skip
                result = subprocess.run(argv, env=env, capture_output=True, text=True,
                                        check=True, cwd=tempfile.gettempdir())  # fmt: skip
                for key, values in json.loads(result.stdout.splitlines()[-1]).items():
                    got[name][key] += values
    out = []
    for name, times in got.items():
        quiet, busy = times["quiet"], times["busy"]
        build = times["build_s"]
        out.append((f"{label}, {name}", f"busy {_pause_line(busy)}; quiet {_pause_line(quiet)}"))
        out.append((f"  {name}: busy / quiet",
                    f"p99 {pct(busy, .99) / pct(quiet, .99):.2f}x "
                    f"max {max(busy) / max(quiet):.2f}x; "
                    f"writer busy {min(build):.1f}-{max(build):.1f} s a call"))  # fmt: skip
    if len(got) == 2:
        base, this = got["baseline"]["busy"], got["this tree"]["busy"]
        out.append(("  this tree / baseline, busy",
                    f"p99 {pct(this, .99) / pct(base, .99):.2f}x "
                    f"max {max(this) / max(base):.2f}x"))  # fmt: skip
    return out


_SHORT_SCRIPT = """
import sys, time
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_bq_audit import BigQueryAuditHandler
endpoint, project, writer, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
handler = BigQueryAuditHandler(table="bench_short_" + writer, emulator_host=endpoint,
                               project=project, writer_process=writer == "process")
chain = (ChatPromptTemplate.from_messages([("human", "{q}")])
         | FakeListChatModel(responses=["ok"]) | StrOutputParser())
start = time.perf_counter()
for _ in range(calls):
    chain.invoke({"q": "hi"}, config={"callbacks": [handler]})
print(time.perf_counter() - start, handler.stats()["writer_process"] or 0, flush=True)
"""


def short_script(bq: LocalBigQuery, rounds: int, calls: int) -> list[tuple[str, str]]:
    """What the writer process costs a short script: a child process that imports the
    package, makes a handler, runs `calls` quick calls and exits (the exit drain writes its
    rows), with the writer thread and with the writer process, alternately. Wall time from
    start to exit, time after the last call, and CPU time of the script and (Linux) of its
    writer process, which this process adopts as a subreaper to read it."""
    import ctypes

    adopts = sys.platform == "linux" and ctypes.CDLL(None).prctl(36, 1) == 0  # SUBREAPER
    got: dict[str, dict[str, list[float]]] = {
        writer: {"wall": [], "exit": [], "cpu": []} for writer in ("thread", "process")
    }
    for writer in got:  # the tables, made untimed
        subprocess.run([sys.executable, "-c", _SHORT_SCRIPT, bq.endpoint, bq.project, writer,
                        "1"], check=True, capture_output=True)  # fmt: skip
    for round_ in range(rounds):
        for writer in list(got) if round_ % 2 == 0 else list(got)[::-1]:
            start = time.perf_counter()
            argv = [sys.executable, "-c", _SHORT_SCRIPT, bq.endpoint, bq.project, writer,
                    str(calls)]  # fmt: skip
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            printed = time.perf_counter()
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = 0  # reaped above
            cpu = usage.ru_utime + usage.ru_stime
            child = int(line[1])
            if child and adopts:
                try:  # the writer process, once the script is gone
                    _, _, usage = os.wait4(child, 0)
                    cpu += usage.ru_utime + usage.ru_stime
                except ChildProcessError:  # reaped by the script itself
                    pass
            end = time.perf_counter()
            got[writer]["wall"].append(end - start)
            got[writer]["exit"].append(end - printed)
            got[writer]["cpu"].append(cpu)
    out = []
    for writer, figures in got.items():
        med = {key: statistics.median(values) for key, values in figures.items()}
        out.append((f"short script, {calls} calls, writer {writer} (median of {rounds})",
                    f"start to exit {med['wall']:.2f} s, after the last call "
                    f"{med['exit']:.2f} s, CPU {med['cpu']:.2f} s"))  # fmt: skip
    ratio = {key: statistics.median(got["process"][key]) / statistics.median(got["thread"][key])
             for key in ("wall", "cpu")}  # fmt: skip
    out.append(("  process / thread", f"wall {ratio['wall']:.2f}x CPU {ratio['cpu']:.2f}x"))
    return out


def dispatch(bq: LocalBigQuery, rounds: int, per_round: int) -> list[tuple[str, str]]:
    """The same audit handler called by LangChain three ways, against a no-op inline one.

    `inline`: `run_inline = True` (what langchain-core's #39633 punishes other handlers for);
    `thread pool`: `run_inline = False`, so async code runs each callback in LangChain's
    executor; `shipped`: inline except inside that bug's code path (handler.run_inline).
    """
    options = dict(table="bench_dispatch", emulator_host=bq.endpoint, project=bq.project,
                   writer_process=True)  # fmt: skip
    shipped = writer_process_handler(bq, "bench_dispatch")
    handlers: dict[str, Any] = {
        "no-op": Noop(),
        "inline": type("Inline", (BigQueryAuditHandler,), {"run_inline": True})(**options),
        "thread pool": type("Pool", (BigQueryAuditHandler,), {"run_inline": False})(**options),
        "shipped": shipped,
    }
    model = FakeListChatModel(responses=["x" * 50])
    small = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    out = []
    for mode in ("invoke", "ainvoke", "astream"):
        times: dict[str, list[float]] = {name: [] for name in handlers}
        for handler in handlers.values():
            timed_calls(small, {"q": "hi"}, handler, per_round // 4, mode)
        for _ in range(rounds):
            for name, handler in handlers.items():
                times[name] += timed_calls(small, {"q": "hi"}, handler, per_round, mode)
                if name != "no-op":
                    settle(handler)
        n = times["no-op"]
        out.append((f"{mode} small (50 tokens)",
                    f"no-op p50 {pct(n, .5) * 1e6:.0f} us"))  # fmt: skip
        for name in list(handlers)[1:]:
            out.append((f"  audit, {name}", ratios(times[name], n)))
    shipped.close()
    return out


def captured_records(n: int, chain_name: str = "small") -> list[Any]:
    """Finished-run records of real chain calls (`chains()[chain_name]`), caught before the
    writer sees them."""
    handler = BigQueryAuditHandler(table="bench_capture", emulator_host="127.0.0.1:9",
                                   spool_enabled=False, handle_sigterm=False)  # fmt: skip
    records: list[RunRecord] = []
    handler._submit = records.append  # the benchmark keeps the records instead of writing them
    chain, inputs = chains()[chain_name]
    while len(records) < n:
        chain.invoke(inputs, config={"callbacks": [handler]})
    return records[:n]


def row_building(n: int) -> list[tuple[str, str]]:
    from langchain_bq_audit.sinks.arrow import encode
    from langchain_bq_audit.sinks.insert_all import request_body

    records = captured_records(n)
    settings = AuditSettings()
    start = time.perf_counter()
    rows = [build_row(r, settings) for r in records]
    built = time.perf_counter()
    chain = HashChain()
    for row in rows:
        chain.link(row)
    chained = time.perf_counter()
    for i in range(0, n, 500):  # what the insertAll sink sends for a batch
        batch = rows[i : i + 500]
        request_body(batch, [r["event_id"] for r in batch])
    as_json = time.perf_counter()
    for i in range(0, n, 500):
        encode(rows[i : i + 500])[0].serialize()
    as_arrow = time.perf_counter()

    from langchain_bq_audit.writer_process import FEED_RUNS, _dumps

    holds = []  # what the writer process's feeder does instead: pickle runs, FEED_RUNS a call
    for i in range(0, n, FEED_RUNS):
        hold = time.perf_counter()
        _dumps(records[i : i + FEED_RUNS])
        holds.append(time.perf_counter() - hold)

    def us(seconds: float) -> str:
        return f"{seconds / n * 1e6:.1f} us/row"

    to_json, to_arrow = as_json - chained, as_arrow - as_json
    large = captured_records(max(40, n // 25), "20 x 2 KB")
    stages = ("  built, of which", f"small: {row_stages(records, settings)}; "
              f"20 x 2 KB: {row_stages(large, settings)}")  # fmt: skip
    return [
        ("rows built (no network)", f"{n / (built - start):,.0f} rows/s ({us(built - start)})"),
        stages,
        ("hash chain", us(chained - built)),
        ("encode: insertAll JSON / Arrow", f"{us(to_json)} / {us(to_arrow)}"),
        ("built + chained + encoded", f"{n / (chained - start + to_json):,.0f} rows/s as JSON, "
         f"{n / (chained - start + to_arrow):,.0f} as Arrow, one core (target >= 50,000)"),
        ("writer process: runs pickled", f"{us(sum(holds))}; the longest pickle "
         f"({FEED_RUNS} runs, one hold of the lock) {max(holds) * 1e3:.2f} ms"),
    ]  # fmt: skip


def row_stages(records: list[Any], settings: AuditSettings) -> str:
    """Where a row's build time goes: the columns (`rows._build`), redaction (credentials
    only, in `full` mode; `redact.redact_row`) and fitting to size (`rows.fit_row`), us a
    row, best of three passes."""
    from langchain_bq_audit.redact import redact_row
    from langchain_bq_audit.rows import _build, fit_row

    best = [float("inf")] * 3
    for _ in range(3):
        start = time.perf_counter()
        rows = [_build(r, settings) for r in records]
        built = time.perf_counter()
        for row in rows:
            redact_row(row, settings.capture_mode, settings.redactors, settings.user_id_key)
        redacted = time.perf_counter()
        for row in rows:
            fit_row(row, settings.max_field_chars, settings.max_row_bytes)
        fitted = time.perf_counter()
        for i, took in enumerate((built - start, redacted - built, fitted - redacted)):
            best[i] = min(best[i], took / len(records) * 1e6)
    return f"columns {best[0]:.1f} us, redaction {best[1]:.1f} us, fitting {best[2]:.1f} us"


def sink_throughput(client: Any, bq: LocalBigQuery, n: int) -> list[tuple[str, str]]:
    records = captured_records(n)
    out = []
    runs = [(sink, batch_rows, False) for sink in ("insert_all", "write_api")
            for batch_rows in (100, 500, 2000)] + [("insert_all", 500, True)]  # fmt: skip
    for sink, batch_rows, own_process in runs:
        settings = AuditSettings(table=f"bench_{sink}_{batch_rows}_{int(own_process)}",
                                 batch_rows=batch_rows, batch_age_s=0.05, spool_enabled=False,
                                 sink=sink, write_api_host=bq.grpc_target,
                                 emulator_host=bq.endpoint, project=bq.project)  # fmt: skip
        writer: Writer | ProcessWriter = (ProcessWriter(settings) if own_process
                                          else Writer(settings, client))  # fmt: skip
        writer.submit(records[0])  # the table and the sink's connection, made untimed
        assert writer.flush(60), writer.stats()
        if own_process:
            pin_writer_process(bq, writer)
        start = time.perf_counter()
        for r in records:
            writer.submit(r)
        assert writer.flush(300), writer.stats()
        elapsed = time.perf_counter() - start
        name = "insertAll" if sink == "insert_all" else "Storage Write API"
        name += ", writer process" if own_process else ""
        out.append((f"{name}, batch {batch_rows}", f"{n / elapsed:,.0f} rows/s committed"))
        writer.close(10)
    return out


def memory(handler: Any, label: str, calls: int) -> list[tuple[str, str]]:
    model = FakeListChatModel(responses=["ok"])
    cfg: RunnableConfig = {"callbacks": [handler]}
    for _ in range(2000):
        model.invoke("q", config=cfg)
    settle(handler)
    gc.collect()
    before = rss_mb()
    half = before
    for i in range(calls):
        model.invoke("q", config=cfg)
        if i % 20_000 == 0:  # keep pace with the sink, as a healthy one does
            handler.flush(120)
        if i == calls // 2:  # growth that levels off is the allocator, not a leak
            half = rss_mb()
    settle(handler)
    gc.collect()
    after = rss_mb()
    stats = handler.stats()
    child = stats["writer_process"]
    extra = f", writer process RSS {rss_mb(child):.0f} MB" if child else ""
    return [(f"memory over {calls:,} calls, {label}",
             f"RSS {before:.0f} -> {half:.0f} (half way) -> {after:.0f} MB "
             f"(+{after - before:.1f} MB; target <= 50), "
             f"pending runs {stats['pending_runs']}{extra}")]  # fmt: skip


_OTEL_CHILD = """
import sys, time, timeit, uuid
from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.context import otel_span_ids

handler = BigQueryAuditHandler(emulator_host="127.0.0.1:9", project="p", table="bench_otel",
                               run_types="tool", spool_enabled=False)  # runs tracked, not written

def pair():
    run_id = uuid.uuid4()
    handler.on_chain_start({}, {"q": 1}, run_id=run_id, parent_run_id=None)
    handler.on_chain_end({"a": 1}, run_id=run_id)

def us(fn, n):  # CPU time of this thread: less moved by other processes than wall time
    return min(timeit.repeat(fn, number=n, repeat=5, timer=time.thread_time)) / n * 1e6

def report(state):
    print(f"{state}|{us(otel_span_ids, 100_000):.2f} us|{us(pair, 20_000):.1f} us")

if sys.argv[1] == "absent":
    report("OpenTelemetry not imported")
else:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    report("opentelemetry.trace imported, no span")
    with TracerProvider().get_tracer("b").start_as_current_span("s"):
        report("a sampled SDK span")
    with TracerProvider(sampler=ALWAYS_OFF).get_tracer("b").start_as_current_span("s"):
        report("an SDK span not sampled")
handler.close(timeout=1)
"""


def otel_cost() -> list[tuple[str, str]]:
    """What reading the current OpenTelemetry span costs at a run's start, beside the start
    and end callbacks of one run, in a child process per state (`absent` blocks importing
    OpenTelemetry, as if not installed: google-cloud-bigquery imports it when it is)."""
    out = []
    for state in ("absent", "present"):
        argv = [sys.executable, "-c", _OTEL_CHILD, state]
        if state == "absent":
            argv[2] = "import sys; sys.modules['opentelemetry'] = None\n" + _OTEL_CHILD
        lines = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        for line in lines.splitlines():
            label, span, pair = line.split("|")
            out.append((f"otel span read: {label}", f"{span} (start + end callbacks {pair})"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls in the memory run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=400)
    parser.add_argument("--pause-calls", type=int, default=2000,
                        help="calls per block in the pauses section")  # fmt: skip
    parser.add_argument("--sustained-s", type=float, default=20.0,
                        help="seconds per block in the sustained section")  # fmt: skip
    parser.add_argument("--pause-mb", type=float, default=1.0,
                        help="MB of text in the large call of the pauses section")  # fmt: skip
    parser.add_argument("--gc-freeze", action="store_true",
                        help="pauses: run the tight loops after gc.freeze(), as an app may "
                        "once it has started")  # fmt: skip
    parser.add_argument("--against", default=None, metavar="TREE",
                        help="pauses: also run the large-call variant with the package of "
                        "this checkout (e.g. a git worktree of main), alternately")  # fmt: skip
    parser.add_argument("--only",
                        default="import,otel,hot,sustained,pauses,short,dispatch,floor,rows,sinks,"
                        "memory",
                        help="sections")  # fmt: skip
    args = parser.parse_args()
    only = set(args.only.split(","))
    os.environ["BQ_AUDIT_SPOOL_DIR"] = tempfile.mkdtemp(prefix="bq-audit-bench-spool-")
    results: list[tuple[str, str]] = []
    if "import" in only:
        results += import_cost()
    if "otel" in only:
        results += otel_cost()
    with LocalBigQuery(tempfile.mkdtemp(prefix="bq-audit-bench-")) as bq:
        client = bq.client()
        assert bq.pid is not None
        results.append(("CPUs", pin_apart(bq.pid)))
        if "hot" in only:
            results += hot_path(bq, args.rounds, args.per_round)
        if "sustained" in only:
            results += sustained(bq, 2, args.sustained_s)
        if "pauses" in only:
            results += pauses(bq, args.rounds, args.pause_calls, args.gc_freeze)
            results += large_pauses_report(bq, args.rounds, args.pause_mb, args.against)
        if "short" in only:
            results += short_script(bq, args.rounds, 10)
        if "dispatch" in only:
            results += dispatch(bq, args.rounds, args.per_round)
        if "floor" in only:
            results += noise_floor(bq, args.rounds, args.per_round)
        if "rows" in only:
            results += row_building(20_000)
        if "sinks" in only:
            results += sink_throughput(client, bq, 20_000)
        if "memory" in only:
            thread = BigQueryAuditHandler(client=client, table="bench_memory")
            results += memory(thread, "writer thread", args.calls)
            thread.close()
            process = writer_process_handler(bq, "bench_memory_process")
            results += memory(process, "writer process", args.calls)
            process.close()
    width = max(len(k) for k, _ in results)
    print(
        f"langchain-bq-audit benchmarks (Python {sys.version.split()[0]}, {os.cpu_count()} cores)"
    )
    for key, value in results:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
