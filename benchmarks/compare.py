"""The hot path of two checkouts side by side: is this tree slower than an older one?

    .venv/bin/python -m benchmarks.compare /path/to/old/checkout [--runs 4] [--rounds 5]

Starts one local BigQuery, then runs the same measurement in child processes, alternately
with the old checkout's `langchain_bq_audit` and with this one's (old, new, old, new, ...),
so drift on a shared machine hits both alike. Each run times the small chain
(`ChatPromptTemplate | FakeListChatModel | StrOutputParser`) with a no-op `run_inline`
handler, the default handler (writer thread) and `writer_process=True`, in interleaved
rounds, after a warm-up, and waits untimed for each handler's backlog between rounds. Only
public API is used (the handler, `flush`, `stats()["queued"]`), so any checkout since the
writer process exists can be measured. Prints each run's ratios to the no-op (p50 / mean /
p99), then rows a second written by each writer from the first of 1,000 calls to the last
row written (`--per-round` x 5 calls), and, per figure, the median over runs of old and new.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import asyncio, json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
import langchain_bq_audit
from langchain_bq_audit import BigQueryAuditHandler

endpoint, rounds, per_round, tag = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

class Noop(BaseCallbackHandler):
    run_inline = True

chain = (ChatPromptTemplate.from_messages([("human", "{q}")])
         | FakeListChatModel(responses=["an answer"]) | StrOutputParser())
handlers = {
    "no-op": Noop(),
    "writer thread": BigQueryAuditHandler(table=f"cmp_{tag}_t", emulator_host=endpoint),
    "writer process": BigQueryAuditHandler(table=f"cmp_{tag}_p", emulator_host=endpoint,
                                           writer_process=True),
}

def settle(handler):
    if isinstance(handler, BigQueryAuditHandler):
        handler.flush(300)
        while handler.stats()["queued"]:
            time.sleep(0.05)

def timed(handler, n, mode):
    config = {"callbacks": [handler]}
    out = []
    if mode == "invoke":
        for i in range(n):
            t = time.perf_counter(); chain.invoke({"q": f"q{i}"}, config=config)
            out.append(time.perf_counter() - t)
        return out
    async def calls():
        for i in range(n):
            t = time.perf_counter(); await chain.ainvoke({"q": f"q{i}"}, config=config)
            out.append(time.perf_counter() - t)
    asyncio.run(calls())
    return out

result = {"package": langchain_bq_audit.__file__}
for mode in ("invoke", "ainvoke"):
    for handler in handlers.values():
        timed(handler, per_round // 2, mode); settle(handler)
    times = {name: [] for name in handlers}
    for r in range(rounds):
        names = list(handlers)[r % 3:] + list(handlers)[:r % 3]  # rotate the order
        for name in names:
            times[name] += timed(handlers[name], per_round, mode)
            settle(handlers[name])
    base = times["no-op"]
    def q(v, p): return sorted(v)[int(p * (len(v) - 1))]
    for name in list(handlers)[1:]:
        v = times[name]
        result[f"{mode} {name}"] = [q(v, .5) / q(base, .5),
                                    statistics.fmean(v) / statistics.fmean(base),
                                    q(v, .99) / q(base, .99)]
for handler in list(handlers.values())[1:]:
    handler.close()
# throughput: rows a second from the first of `per_round * 5` calls until all are written
for name, options in (("writer thread", {}), ("writer process", {"writer_process": True})):
    handler = BigQueryAuditHandler(table=f"cmp_{tag}_{name[7]}x", emulator_host=endpoint,
                                   **options)
    timed(handler, 5, "invoke"); settle(handler)  # table made, threads or process started
    before = handler.stats()["written"]
    t = time.perf_counter()
    timed(handler, per_round * 5, "invoke"); settle(handler)
    rows = handler.stats()["written"] - before
    result[f"throughput {name}"] = [rows / (time.perf_counter() - t)]
    handler.close()
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", help="a checkout of this project (its folder)")
    parser.add_argument("--runs", type=int, default=4, help="runs of each checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    new = str(Path(__file__).resolve().parents[1])
    from langchain_bq_audit.emulator import LocalBigQuery

    results: dict[str, list[dict[str, list[float]]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp, LocalBigQuery(Path(tmp)).start(300) as bq:
        for run in range(args.runs):
            for label, path in (("old", args.old), ("new", new)):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, path, bq.host_port, str(args.rounds),
                     str(args.per_round), f"{label}{run}"],
                    capture_output=True, text=True, check=True, cwd=tmp,
                    env={**os.environ, "PYTHONPATH": ""},
                )  # fmt: skip
                figures = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"run {run + 1} {label} ({figures.pop('package')}):")
                for name, values in figures.items():
                    print(f"  {name}: {cell(name, values)}")
                results[label].append(figures)
    print("median over runs (old -> new):")
    for name in results["new"][0]:
        old = [statistics.median(r[name][i] for r in results["old"]) for i in range(3)
               if len(results["old"][0][name]) > i]  # fmt: skip
        now = [statistics.median(r[name][i] for r in results["new"]) for i in range(len(old))]
        print(f"  {name}: {cell(name, old)}  ->  {cell(name, now)}")


def cell(name: str, values: list[float]) -> str:
    """A run's figures as text: ratios to the no-op (p50, mean, p99) or rows a second."""
    if name.startswith("throughput"):
        return f"{values[0]:,.0f} rows/s"
    return "  ".join(f"{s} {v:.2f}x" for s, v in zip(("p50", "mean", "p99"), values, strict=True))


if __name__ == "__main__":
    main()
