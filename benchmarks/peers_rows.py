"""What each BigQuery handler writes for one `prompt | model | parser` call, and what is left
at process exit without an explicit flush, measured against the embedded BigQuery.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python -m benchmarks.peers_rows [--calls 20]

For this handler and langchain-google-community's `BigQueryCallbackHandler` (default
config, views off: the emulator's SQL does not take their DDL): the table's columns, the rows
one call writes (by run type / event type), the rows found after a child process made
`--calls` calls and exited with no flush, close or shutdown, and how long writing those
rows takes when the child does flush. Google ADK's BigQuery Agent Analytics plugin is not
run: see the README ("Why this and not the others") for why, and what its source says.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from benchmarks.peers import PEER_DATASET, DummyEndpoint, google_community_handler
from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.emulator import LocalBigQuery
from langchain_bq_audit.spool import destination_dir, read_segment


def chain() -> Any:
    return (ChatPromptTemplate.from_messages([("human", "{q}")])
            | FakeListChatModel(responses=["ok"]) | StrOutputParser())  # fmt: skip


def make(kind: str, rest: str, grpc: str, project: str, token_url: str, table: str) -> Any:
    if kind == "ours":
        return BigQueryAuditHandler(table=table, emulator_host=rest, project=project)
    return google_community_handler(rest, grpc, project, token_url, table)


def child(args: argparse.Namespace) -> None:
    """Make `--calls` calls; with `--flush`, flush and print the seconds it took; then exit
    the way an app that never heard of flushing does."""
    handler = make(args.child, args.rest, args.grpc, args.project, args.token_url, args.table)
    c = chain()
    for i in range(args.calls):
        c.invoke({"q": f"question {i}"}, config={"callbacks": [handler]})
    if args.flush:
        start = time.perf_counter()
        if args.child == "ours":
            handler.flush(600)
        else:
            handler.flush(timeout=600)
        print(time.perf_counter() - start)


def count(bq: LocalBigQuery, table: str) -> int:
    return int(next(iter(bq.client().query(f"SELECT COUNT(*) FROM `{bq.project}.{table}`")))[0])


def settled_count(bq: LocalBigQuery, table: str, quiet_s: float = 5.0) -> int:
    """The table's row count once it has not changed for `quiet_s` seconds."""
    last, since = -1, time.monotonic()
    while True:
        try:
            now = count(bq, table)
        except Exception:  # the table is made on the first write
            now = 0
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
        time.sleep(0.5)


def spooled(project: str, table: str) -> int:
    """Rows this handler left in its disk spool for `project.table` (replayed later)."""
    folder = destination_dir(Path(os.environ["BQ_AUDIT_SPOOL_DIR"]), f"{project}.{table}")
    return sum(len(read_segment(p).records) for p in sorted(folder.glob("*.seg")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--child", choices=["ours", "google"])
    for name in ("rest", "grpc", "project", "token-url", "table"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--flush", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(args)
    os.environ["BQ_AUDIT_SPOOL_DIR"] = tempfile.mkdtemp(prefix="bq-audit-peers-spool-")
    endpoint = DummyEndpoint()
    lines = []
    try:
        with LocalBigQuery(tempfile.mkdtemp(prefix="bq-audit-peers-rows-")) as bq:
            bq.client().create_dataset(PEER_DATASET, exists_ok=True)
            where = {"ours": "language_model_logging", "google": PEER_DATASET}
            kind_col = {"ours": "run_type", "google": "event_type"}
            for kind in ("ours", "google"):
                name = {"ours": "this handler", "google": "langchain-google-community"}[kind]
                try:
                    handler = make(kind, bq.endpoint, bq.grpc_target, bq.project,
                                   f"{endpoint.url}/token", "one_call")  # fmt: skip
                except ImportError as e:
                    lines.append(f"{name}: skipped, not installed ({e})")
                    continue
                chain().invoke({"q": "hi"}, config={"callbacks": [handler]})
                handler.flush(60) if kind == "ours" else handler.flush(timeout=60)
                table = f"{where[kind]}.one_call"
                columns = [f.name for f in bq.client().get_table(f"{bq.project}.{table}").schema]
                kinds = Counter(
                    r[0] for r in bq.client().query(
                        f"SELECT {kind_col[kind]} FROM `{bq.project}.{table}`").result()
                )  # fmt: skip
                lines.append(f"{name}: {len(columns)} columns: {', '.join(columns)}")
                lines.append(f"{name}: one call writes {sum(kinds.values())} rows: "
                             + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))  # fmt: skip
                for flush in (False, True):
                    table = f"{where[kind]}.exit_{int(flush)}"
                    argv = [sys.executable, "-m", "benchmarks.peers_rows", "--child", kind,
                            "--rest", bq.endpoint, "--grpc", bq.grpc_target, "--project",
                            bq.project, "--token-url", f"{endpoint.url}/token", "--table",
                            table.split(".")[1], "--calls", str(args.calls)]  # fmt: skip
                    start = time.perf_counter()
                    done = subprocess.run(argv + ["--flush"] * flush, capture_output=True,
                                          text=True, timeout=900)  # fmt: skip
                    exited = time.perf_counter() - start
                    rows = settled_count(bq, table)
                    expected = sum(kinds.values()) * args.calls
                    how = "flush, then exit" if flush else "exit without flush/close/shutdown"
                    extra = ""
                    if flush and done.stdout.strip():
                        seconds = float(done.stdout.strip().splitlines()[-1])
                        extra = f"; the flush took {seconds:.1f} s"
                    if kind == "ours":
                        extra += f"; {spooled(bq.project, table)} rows in its disk spool"
                    lines.append(f"{name}: {args.calls} calls in a child process, {how}: "
                                 f"{rows} of {expected} rows written (child ran {exited:.1f} s, "
                                 f"exit code {done.returncode}{extra})")  # fmt: skip
                    if kind == "ours" and not flush:  # what the next process finds
                        subprocess.run([sys.executable, "-m", "langchain_bq_audit", "replay",
                                        "--endpoint", bq.endpoint, "--project", bq.project,
                                        "--table", table.split(".")[1]],
                                       capture_output=True, check=True)  # fmt: skip
                        after = settled_count(bq, table)
                        lines.append(f"{name}:   then `bq-audit replay`: {after} of {expected} "
                                     "rows written")  # fmt: skip
                if kind == "google":
                    handler.shutdown()
                else:
                    handler.close()
    finally:
        endpoint.close()
    load = os.getloadavg()
    print(f"rows and exit behaviour (load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f})")
    for line in lines:
        print("  " + line)


if __name__ == "__main__":
    main()
