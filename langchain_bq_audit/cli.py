"""The `bq-audit` command."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import schema
from .emulator import EmulatorError, LocalBigQuery, find_server

MAX_SESSIONS = 100_000  # `sessions --limit`: a screenful to an export, within INT64


def _cmd_demo(args: argparse.Namespace) -> int:
    from .client import make_client
    from .demo import run_demo
    from .settings import AuditSettings

    if args.endpoint:
        client = make_client(AuditSettings(emulator_host=args.endpoint, project=args.project))
        return run_demo(client, sys.stdout)
    emulator = LocalBigQuery(args.data_dir)
    find_server()  # not installed (any Python but 3.13): one line, before "starting"
    print(f"starting the embedded BigQuery (data in {emulator.data_dir}) ...", flush=True)
    with emulator:
        print(f"local BigQuery ready on {emulator.endpoint}\n", flush=True)
        return run_demo(emulator.client(), sys.stdout)


def _cmd_emulator(args: argparse.Namespace) -> int:
    emulator = LocalBigQuery(
        args.data_dir, port=args.port, grpc_port=args.grpc_port, project=args.project or "local"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with emulator:
        print(
            f"local BigQuery on {emulator.endpoint} (Storage Write API on "
            f"{emulator.grpc_target}), data in {emulator.data_dir}"
        )
        print(f"  export BIGQUERY_EMULATOR_HOST={emulator.host_port}")
        print("Ctrl-C stops it.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def _settings_from(args: argparse.Namespace, **extra: Any) -> Any:
    from .settings import AuditSettings

    return AuditSettings.from_env(
        project=args.project, dataset=args.dataset, table=args.table,
        emulator_host=getattr(args, "endpoint", None), **extra,
    )  # fmt: skip


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width if total <= 0 else min(width, width * done // total)
    pct = 100 if total <= 0 else min(100, 100 * done // total)
    sys.stderr.write(f"\rreplaying [{'#' * filled}{'.' * (width - filled)}] {pct:3d}%")
    sys.stderr.flush()


def _cmd_replay(args: argparse.Namespace) -> int:
    from .spool import default_spool_dir, spooled_destinations

    settings = _settings_from(args, spool_dir=args.spool_dir, handle_sigterm=False)
    if not settings.spool_enabled:
        print("bq-audit: the spool is disabled (BQ_AUDIT_SPOOL_ENABLED=false)", file=sys.stderr)
        return 2
    if not args.all:
        return _replay_one(settings)
    root = Path(settings.spool_dir) if settings.spool_dir else default_spool_dir()
    found = spooled_destinations(root)
    if not found:
        print(f"nothing to replay in {root}")
    code = 0
    for project, dataset, table in found:
        one = settings.replace(project=None if project == "default" else project,
                               dataset=dataset, table=table)  # fmt: skip
        code = max(code, _replay_one(one, f"{project}.{dataset}.{table}"))
    return code


def _replay_one(settings: Any, destination: str | None = None) -> int:
    from .writer import Writer

    writer = Writer(settings, destination=destination)
    assert writer.spool is not None
    segments = writer.spool.segments()
    if not segments:
        print(f"nothing to replay in {writer.spool.dir}")
        return 0
    print(f"replaying {len(segments)} segment(s) from {writer.spool.dir} to {writer.destination}")
    replayed = writer.replay_now(_progress_bar)
    sys.stderr.write("\n")
    # the views its first rows started (a new table): made before this command ends
    writer.flush(max(settings.shutdown_timeout_s, settings.batch_deadline_s))
    stats = writer.stats()
    left = len(writer.spool.segments())
    # replayed but not removable (a read-only spool): still on disk, so still `left` as
    # `bq-audit stats` counts them, though their rows are written
    kept = writer.spool.replayed_not_removed()
    why = (f" ({kept} replayed, but could not be removed: a later replay sends their rows "
           "again, same event_id; remove them by hand)") if kept else ""  # fmt: skip
    print(
        f"replayed {replayed} rows; {stats['replay_dead_lettered']} dead-lettered; "
        f"{stats['corrupt_spool_records']} torn records skipped; {left + kept} segment(s) left"
        f"{why}"
    )
    if left:
        print(f"bq-audit: BigQuery did not take everything: {stats['last_error']}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from .client import make_client
    from .provision import SchemaMismatchError, ensure_table

    settings = _settings_from(args, location=args.location, retention_days=args.retention_days,
                              labels=args.labels)  # fmt: skip
    client = make_client(settings)
    try:
        report = ensure_table(client, settings, timeout=args.timeout, digests=True)
    except SchemaMismatchError as exc:
        print(f"bq-audit: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import datetime as dt

    from .integrity import verify
    from .reading import run_query

    keys: dict[str, Any] = {}
    if args.public_key:
        from .digests import key_id, load_public_key

        try:
            keys = {key_id(k): k for k in map(load_public_key, args.public_key)}
        except ValueError as exc:
            print(f"bq-audit: {exc}", file=sys.stderr)
            return 2
    client, full = _client_and_table(args)
    sql = f"SELECT * FROM `{full}` WHERE chain_id IS NOT NULL"
    params: dict[str, Any] = {}
    if args.since:
        try:
            params["since"] = dt.date.fromisoformat(args.since)
        except ValueError:
            print(f"bq-audit: --since wants a date like 2026-11-25, got {args.since!r}",
                  file=sys.stderr)  # fmt: skip
            return 2
        sql += " AND timestamp >= TIMESTAMP(@since)"
    rows = run_query(client, sql, params, timeout=600)
    report = verify(rows, from_start=args.since is None)
    if not keys:
        return _print_verified(full, report.rows, {}, report.findings, [])
    from .digests import check

    digests = _read_digests(client, full, args.digest_file)
    signed = check(rows, digests, keys, from_start=args.since is None)
    findings = sorted(report.findings + signed.findings, key=lambda f: (f.chain_id, f.seq))
    code = _print_verified(full, report.rows, signed.digests, findings, signed.unproven)
    print(
        "what this cannot prove: rows written after a chain's last signed digest (up to "
        "digest_every_rows rows or digest_every_s seconds; more if the writer was killed "
        "before close) can be edited, deleted or appended to without a trace; and a chain "
        "whose digests were deleted too (keep a copy with digest_file, --digest-file)"
        + ("; with --since, chains deleted whole are not looked for" if args.since else "")
    )
    return code


def _read_digests(client: Any, full: str, files: list[str] | None) -> list[dict[str, Any]]:
    """Every digest of the table's digests table (none when it is missing) and of `files`."""
    from google.api_core.exceptions import NotFound

    from .digests import read_digest_file
    from .reading import run_query

    digests: list[dict[str, Any]] = []
    try:
        digests = run_query(client, f"SELECT * FROM `{full}{schema.DIGEST_TABLE_SUFFIX}`",
                            timeout=600)  # fmt: skip
    except NotFound:
        print(f"note: no table {full}{schema.DIGEST_TABLE_SUFFIX}: no digest in BigQuery")
    for path in files or ():
        digests += read_digest_file(path)
    return digests


def _print_verified(
    full: str, rows: dict[str, int], digests: dict[str, int], findings: list[Any],
    unproven: list[str],
) -> int:  # fmt: skip
    """Print per chain, then the findings and what is not covered; the exit code."""
    for chain_id in sorted(set(rows) | {f.chain_id for f in findings}):
        bad = sum(1 for f in findings if f.chain_id == chain_id)
        signed = f", {digests[chain_id]} signed digest(s)" if chain_id in digests else ""
        print(f"chain {chain_id}: {rows.get(chain_id, 0)} rows{signed}, "
              f"{'ok' if not bad else f'{bad} finding(s)'}")  # fmt: skip
    for finding in findings:
        print(f"  {finding}")
    for line in unproven:
        print(f"  unproven: {line}")
    print(f"verified {sum(rows.values())} rows in {len(rows)} chain(s) of {full}: "
          f"{len(findings)} finding(s)")  # fmt: skip
    return 1 if findings else 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from .digests import generate_key

    try:
        kid, public = generate_key(args.file)
    except FileExistsError as exc:
        print(f"bq-audit: {exc}", file=sys.stderr)
        return 1
    print(f"private key {args.file} (mode 0600: keep it with the application only)")
    print(f"public key  {public} (give it to whoever verifies: bq-audit verify --public-key)")
    print(f"key id      {kid}")
    print(f"  export BQ_AUDIT_DIGEST_KEY_FILE={Path(args.file).expanduser().resolve()}")
    return 0


def _client_and_table(args: argparse.Namespace) -> tuple[Any, str]:
    from .client import make_client
    from .provision import table_id

    settings = _settings_from(args)
    client = make_client(settings)
    return client, table_id(client, settings)


def _tail_line(row: dict[str, Any]) -> str:
    from .traces import cut

    tokens = f"{row['total_tokens']} tok" if row.get("total_tokens") is not None else "- tok"
    latency = f"{row['latency_ms']:.0f} ms" if row.get("latency_ms") is not None else "-"
    status = row.get("status") or "-"
    if row.get("error_type"):
        status = f"{status}:{row['error_type']}"
    return (
        f"{row['timestamp']:%Y-%m-%d %H:%M:%S}  {cut(row.get('session_id') or '-', 12):12}  "
        f"{cut(row.get('user_id') or '-', 10):10}  {row.get('run_type') or '-':10}  "
        f"{cut(row.get('name') or '-', 18):18}  {cut(status, 24):24}  {tokens:>8}  "
        f"{latency:>8}  {cut(row.get('input_text'), 40)!r} -> {cut(row.get('output_text'), 40)!r}"
    )


def _cmd_tail(args: argparse.Namespace) -> int:
    import datetime as dt
    import json
    import time

    from .reading import recent_rows

    client, table = _client_and_table(args)

    def show(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            print(json.dumps(row, default=str) if args.json else _tail_line(row), flush=True)

    # With --follow, a row can reach the table after rows that ended later than it (another
    # process's writer, a batch still filling, a retry): every poll reads the rows that ended
    # in the last `--lookback` seconds and shows those it has not shown yet. What is there
    # before the first rows are shown counts as seen.
    lookback = dt.timedelta(seconds=args.lookback)
    started = dt.datetime.now(dt.timezone.utc)
    there = recent_rows(client, table, 1000, args.session, args.user, started - lookback) \
        if args.follow else []  # fmt: skip
    rows = recent_rows(client, table, args.n, args.session, args.user)
    if not rows and not args.follow:
        print(f"no rows in {table}" + (" for that filter" if args.session or args.user else ""),
              file=sys.stderr)  # fmt: skip
    show(rows)
    if not args.follow:
        return 0
    seen = {r["event_id"]: r["timestamp"] for r in there + rows}
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(args.interval)
            since = dt.datetime.now(dt.timezone.utc) - lookback
            new = [r for r in recent_rows(client, table, 1000, args.session, args.user, since)
                   if r["event_id"] not in seen]  # fmt: skip
            show(new)
            seen.update((r["event_id"], r["timestamp"]) for r in new)
            seen = {k: t for k, t in seen.items() if t > since}  # what the next poll can read
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    import json

    from .reading import trace_rows
    from .traces import trace_lines

    client, table = _client_and_table(args)
    rows = trace_rows(client, table, _run_id_text(args.id))
    if not rows:
        print(f"bq-audit: no run in {table} has trace id, run id or event id {args.id!r}",
              file=sys.stderr)  # fmt: skip
        return 1
    lines = [json.dumps(r, default=str) for r in rows] if args.json else trace_lines(rows)
    print("\n".join(lines))
    return 0


def _run_id_text(text: str) -> str:
    """A UUID as LangChain writes run ids (lowercase, dashed), however it was pasted
    (`UUID('...')` of a log line, upper case, 32 hex digits); other text as given."""
    import uuid

    bare = text.strip().removeprefix("UUID(").rstrip(")").strip("'\"")
    try:
        return str(uuid.UUID(bare))
    except ValueError:
        return text


def _cmd_sessions(args: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from .reading import recent_sessions
    from .traces import session_lines

    if not 1 <= args.limit <= MAX_SESSIONS:
        print(f"bq-audit: --limit wants a number of sessions from 1 to {MAX_SESSIONS:,}, "
              f"got {args.limit}", file=sys.stderr)  # fmt: skip
        return 2
    since = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since)
        except ValueError:
            print(f"bq-audit: --since wants a date or time like 2026-11-25 or "
                  f"2026-11-25T14:00, got {args.since!r}", file=sys.stderr)  # fmt: skip
            return 2
        since = since if since.tzinfo else since.replace(tzinfo=dt.timezone.utc)
    client, table = _client_and_table(args)
    sessions = recent_sessions(client, table, args.limit, since)
    if not sessions:
        print(f"no sessions in {table}" + (f" since {args.since}" if since else ""),
              file=sys.stderr)  # fmt: skip
        return 0
    if args.json:
        print("\n".join(json.dumps(s, default=str) for s in sessions))
    else:
        print("\n".join(session_lines(sessions)))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    import json

    from .client import destination_id
    from .reading import summary
    from .spool import Spool, default_spool_dir, read_segment, spooled_destinations
    from .traces import money

    client, table = _client_and_table(args)
    settings = _settings_from(args)
    root = Path(args.spool_dir or settings.spool_dir or default_spool_dir())
    here = destination_id(settings, client)
    names = [here, *(".".join(d) for d in spooled_destinations(root))]
    spools = []
    for destination in dict.fromkeys(names):  # the named destination first, then the rest
        spool = Spool(root, destination, max_bytes=1)  # only read here, never appended to
        segments, dead = spool.segments(), spool.dead_letters()
        spools.append({
            "destination": destination,
            "spool_dir": str(spool.dir),
            "spooled_segments": len(segments),
            "spooled_rows": sum(len(read_segment(p).records) for p in segments),
            "spooled_bytes": spool.size_bytes(),
            "dead_letter_segments": len(dead),
            "dead_letter_rows": sum(len(read_segment(p).records) for p in dead),
        })  # fmt: skip
    local = spools[0]
    try:
        remote = summary(client, table)
    except Exception as exc:  # no table yet: what waits in the spool is still worth showing
        if type(exc).__name__ != "NotFound":
            raise
        remote = dict.fromkeys(("rows", "sessions", "users", "model_calls", "total_tokens",
                                "errors", "newest_run_end", "cost_usd", "unpriced_calls",
                                "model_calls_24h", "cost_usd_24h",
                                "unpriced_calls_24h"))  # fmt: skip
        print(f"table {table}: not found (bq-audit init creates it)", file=sys.stderr)
    if args.json:
        print(json.dumps({"table": table, **remote, **local, "spools": spools}, default=str))
        return 0
    if remote["rows"] is not None:
        print(f"table {table}: {remote['rows']} rows, {remote['sessions']} sessions, "
          f"{remote['users']} users, {remote['model_calls']} model calls, "
          f"{remote['total_tokens']} tokens, {remote['errors']} errors, "
          f"newest run ended {remote['newest_run_end'] or 'never'}")  # fmt: skip
        print(f"cost: {money(remote['cost_usd'], remote['unpriced_calls'])} in all; "
              f"{money(remote['cost_usd_24h'], remote['unpriced_calls_24h'])} over "
              f"{remote['model_calls_24h']} model calls in the last 24 h")  # fmt: skip
    for one in spools:
        if one is not local and not (one["spooled_rows"] or one["dead_letter_rows"]):
            continue
        print(
            f"spool {one['spool_dir']}: {one['spooled_rows']} rows in "
            f"{one['spooled_segments']} segment(s) waiting for replay "
            f"({one['spooled_bytes']} bytes); {one['dead_letter_rows']} rows dead-lettered"
        )
    if any(one["spooled_rows"] for one in spools):
        print("  hint: bq-audit replay --all writes them now")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    from .global_hook import BOOTSTRAP_DIR, ENV_VAR

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("bq-audit: run needs a command, e.g. bq-audit run -- python app.py", file=sys.stderr)
        return 2
    env = os.environ
    env[ENV_VAR] = "true"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (BOOTSTRAP_DIR, env.get("PYTHONPATH")) if p)
    for option, var in (("endpoint", "EMULATOR_HOST"), ("project", "PROJECT"),
                        ("dataset", "DATASET"), ("table", "TABLE")):  # fmt: skip
        value = getattr(args, option)
        if value:
            env[f"BQ_AUDIT_{var}"] = value
    try:
        os.execvp(command[0], command)  # replaces this process: signals and exit code are CMD's
    except OSError as exc:
        print(f"bq-audit: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # pragma: no cover - execvp does not return


def _site_packages(args: argparse.Namespace) -> Path:
    import sysconfig

    return Path(args.site_packages or sysconfig.get_paths()["purelib"])


def _cmd_install_hook(args: argparse.Namespace) -> int:
    from .global_hook import ENV_VAR, PTH_LINE, PTH_NAME

    path = _site_packages(args) / PTH_NAME
    path.write_text(PTH_LINE)
    print(f"wrote {path}: every Python of this environment audits its LangChain runs when "
          f"{ENV_VAR}=true (bq-audit uninstall-hook removes it)")  # fmt: skip
    return 0


def _cmd_uninstall_hook(args: argparse.Namespace) -> int:
    from .global_hook import PTH_NAME

    path = _site_packages(args) / PTH_NAME
    if not path.exists():
        print(f"no hook at {path}")
        return 0
    path.unlink()
    print(f"removed {path}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        print(schema.to_markdown())
    elif args.format == "sql":
        from .settings import AuditSettings

        settings = AuditSettings.from_env(dataset=args.dataset, table=args.table)
        project = args.project or settings.project or "PROJECT"
        print(schema.to_ddl(f"{project}.{settings.dataset}.{settings.table}",
                            args.retention_days))  # fmt: skip
    else:
        print(schema.to_json())
    return 0


def _add_destination(parser: argparse.ArgumentParser, endpoint: bool = False) -> None:
    if endpoint:
        parser.add_argument("--endpoint", help="local BigQuery at HOST:PORT (else the env / ADC)")
    parser.add_argument("--project", help="Google Cloud project (default: env / client)")
    parser.add_argument("--dataset", help="dataset (default: language_model_logging)")
    parser.add_argument("--table", help="table (default: inference_logs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bq-audit",
        description="Audit log of LangChain runs in BigQuery.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    demo = add(
        "demo",
        "Run a small audited app against the embedded BigQuery and show its rows.",
        "bq-audit demo",
    )
    demo.add_argument("--data-dir", help="emulator data directory (default: user data dir)")
    demo.add_argument("--endpoint", help="use a running emulator at HOST:PORT instead")
    demo.add_argument("--project", help="project to use with --endpoint (default: local)")
    demo.set_defaults(func=_cmd_demo)

    emu = add(
        "emulator",
        "Run the embedded BigQuery on 127.0.0.1 until Ctrl-C.",
        "bq-audit emulator --port 9050",
    )
    emu.add_argument("--data-dir", help="data directory (default: user data dir)")
    emu.add_argument("--port", type=int, help="REST port (default: a free one)")
    emu.add_argument("--grpc-port", type=int, help="Storage Write API port (default: free)")
    emu.add_argument("--project", help="default project (default: local)")
    emu.set_defaults(func=_cmd_emulator)

    rep = add(
        "replay",
        "Write rows spooled on this machine to BigQuery, with progress.",
        "BIGQUERY_EMULATOR_HOST=127.0.0.1:9050 bq-audit replay",
    )
    _add_destination(rep, endpoint=True)
    rep.add_argument("--spool-dir", help="spool root (default: user cache dir)")
    rep.add_argument(
        "--all", action="store_true", help="every destination spooled here, not just the one named"
    )
    rep.set_defaults(func=_cmd_replay)

    ini = add(
        "init",
        "Create the dataset, table and views if missing; add columns an older table lacks.",
        "bq-audit init --project my-project --retention-days 400 --labels team=ml",
    )
    _add_destination(ini, endpoint=True)
    ini.add_argument("--location", help="dataset location (default: US)")
    ini.add_argument("--retention-days", type=int, help="partition expiration (default: none)")
    ini.add_argument("--labels", help="extra labels, key=value,key=value")
    ini.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    ini.set_defaults(func=_cmd_init)

    tail = add(
        "tail",
        "Show the latest rows, readable (or --json lines); --follow keeps watching.",
        "bq-audit tail -n 20 --session s-1 --follow",
    )
    tail.add_argument("-n", type=int, default=20, help="how many rows (default 20)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new rows")
    tail.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    tail.add_argument("--lookback", type=float, default=300.0,
                      help="with --follow: show rows that ended up to this many seconds ago "
                           "when they arrive (default 300)")  # fmt: skip
    tail.add_argument("--session", help="only this session_id")
    tail.add_argument("--user", help="only this user_id")
    tail.add_argument("--json", action="store_true", help="one JSON object a line")
    _add_destination(tail, endpoint=True)
    tail.set_defaults(func=_cmd_tail)

    tr = add(
        "trace",
        "Show one trace as a run tree: per run its type, status, latency, tokens, cost and "
        "the start of its input and output. Exit code 1 when no run matches.",
        "bq-audit trace 1f0c6b1e-2f7a-4c1e-9a51-4f4f2e0b7d11",
    )
    tr.add_argument("id", metavar="TRACE_ID",
                    help="a trace id (a root run's id), or the run id or event id of any "
                         "run of the trace")  # fmt: skip
    tr.add_argument("--json", action="store_true", help="its rows, one JSON object a line")
    _add_destination(tr, endpoint=True)
    tr.set_defaults(func=_cmd_trace)

    ses = add(
        "sessions",
        "List the latest sessions, newest first, with their runs, model calls, tokens, cost, "
        "errors, users and first and last time (from the _sessions view).",
        "bq-audit sessions --limit 10 --since 2026-11-25",
    )
    ses.add_argument("--limit", type=int, default=20, help="how many sessions (default 20)")
    ses.add_argument("--since", help="only sessions with a run that ended since this date or "
                                     "UTC time (2026-11-25, 2026-11-25T14:00)")  # fmt: skip
    ses.add_argument("--json", action="store_true", help="one JSON object a line")
    _add_destination(ses, endpoint=True)
    ses.set_defaults(func=_cmd_sessions)

    st = add(
        "stats",
        "Rows, sessions, tokens, cost and errors of the table; rows waiting in the local spool.",
        "bq-audit stats --json",
    )
    st.add_argument("--json", action="store_true", help="one JSON object")
    st.add_argument("--spool-dir", help="spool root (default: user cache dir)")
    _add_destination(st, endpoint=True)
    st.set_defaults(func=_cmd_stats)

    ver = add(
        "verify",
        "Check the table's hash chains: deleted rows (missing seq), edited rows, broken "
        "links; with --public-key, also the signed digests (rewritten hashes, deleted tails "
        "and chains, appended rows). Exit code 1 on any finding.",
        "bq-audit verify --public-key digest-key.pem.pub --since 2026-11-01",
    )
    _add_destination(ver, endpoint=True)
    ver.add_argument("--since", help="only rows from this date (YYYY-MM-DD) on")
    ver.add_argument("--public-key", action="append", metavar="FILE",
                     help="check the signed digests with this public key (repeatable: old "
                          "and new keys after a rotation)")  # fmt: skip
    ver.add_argument(
        "--digest-file",
        action="append",
        metavar="FILE",
        help="also read digests from this JSON-lines copy (digest_file)",
    )
    ver.set_defaults(func=_cmd_verify)

    key = add(
        "keygen",
        "Make an Ed25519 key for signed digests: FILE (private, 0600) and FILE.pub.",
        "bq-audit keygen ~/.config/bq-audit/digest-key.pem",
    )
    key.add_argument("file", help="where to write the private key (never overwritten)")
    key.set_defaults(func=_cmd_keygen)

    run = add(
        "run",
        "Run a command with every LangChain run of it, and of the Python processes it starts "
        "(uvicorn and gunicorn workers too), audited: no code change.",
        "bq-audit run -- uvicorn app:api --workers 4",
    )
    _add_destination(run, endpoint=True)
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    run.set_defaults(func=_cmd_run)

    for name, help_, func in (
        ("install-hook", "Make LANGCHAIN_BQ_AUDIT=true alone audit every Python of this "
         "environment: writes a one-line .pth file into site-packages.", _cmd_install_hook),
        ("uninstall-hook", "Remove the .pth file install-hook wrote.", _cmd_uninstall_hook),
    ):  # fmt: skip
        hook = add(name, help_, f"bq-audit {name}")
        hook.add_argument("--site-packages", help="where (default: this Python's site-packages)")
        hook.set_defaults(func=func)

    sch = add(
        "schema",
        "Print the audit table's schema: JSON for `bq mk`, Markdown for docs, or SQL DDL.",
        "bq-audit schema --format sql --project my-project | bq query --use_legacy_sql=false",
    )
    sch.add_argument("--format", choices=("json", "markdown", "sql"), default="json")
    _add_destination(sch)
    sch.add_argument("--retention-days", type=int, help="with --format sql: partition expiration")
    sch.set_defaults(func=_cmd_schema)
    return parser


def explain(exc: BaseException) -> str | None:
    """One line, with a hint, for the errors a new user meets; None for anything else."""
    name = type(exc).__name__
    if name == "RetryError" and getattr(exc, "cause", None) is not None:
        return explain(exc.cause)  # type: ignore[attr-defined]
    if isinstance(exc, EmulatorError):
        return str(exc)
    if name == "DefaultCredentialsError":
        return (
            "no Google Cloud credentials found. hint: try it locally with `bq-audit emulator` "
            "and --endpoint HOST:PORT, or run `gcloud auth application-default login` and pass "
            "--project"
        )
    if isinstance(exc, OSError) and "Project was not passed" in str(exc):
        return "no Google Cloud project configured. hint: pass --project or set BQ_AUDIT_PROJECT"
    if name == "NotFound":
        message = str(getattr(exc, "message", exc)).strip().splitlines()[0].rstrip(".")
        return f"{message}. hint: create the dataset, table and views with `bq-audit init`"
    if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout") or isinstance(
        exc, ConnectionError
    ):
        return (
            f"cannot reach BigQuery ({type(exc).__name__}). hint: is the local BigQuery "
            "running (`bq-audit emulator`) and --endpoint / BIGQUERY_EMULATOR_HOST right?"
        )
    if isinstance(exc, ValueError) and "BQ_AUDIT_" in str(exc):
        return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): not a BigQuery fault; quiet, like other tools
        _silence_stdout()
        return 141
    except Exception as exc:
        line = explain(exc)
        if line is None:
            raise
        print(f"bq-audit: {line}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
