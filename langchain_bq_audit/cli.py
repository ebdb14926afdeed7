"""The `bq-audit` command."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import schema
from .emulator import EmulatorError, LocalBigQuery


def _cmd_demo(args: argparse.Namespace) -> int:
    from .client import make_client
    from .demo import run_demo
    from .settings import AuditSettings

    if args.endpoint:
        client = make_client(AuditSettings(emulator_host=args.endpoint, project=args.project))
        return run_demo(client, sys.stdout)
    emulator = LocalBigQuery(args.data_dir)
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
    from .writer import Writer

    settings = _settings_from(args, spool_dir=args.spool_dir, handle_sigterm=False)
    writer = Writer(settings)
    if writer.spool is None:
        print("bq-audit: the spool is disabled (BQ_AUDIT_SPOOL_ENABLED=false)", file=sys.stderr)
        return 2
    segments = writer.spool.segments()
    if not segments:
        print(f"nothing to replay in {writer.spool.dir}")
        return 0
    print(f"replaying {len(segments)} segment(s) from {writer.spool.dir} to {writer.destination}")
    replayed = writer.replay_now(_progress_bar)
    sys.stderr.write("\n")
    stats = writer.stats()
    left = len(writer.spool.segments())
    print(
        f"replayed {replayed} rows; {stats['dead_lettered']} dead-lettered; "
        f"{stats['corrupt_spool_records']} torn records skipped; {left} segment(s) left"
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
        report = ensure_table(client, settings, timeout=args.timeout)
    except SchemaMismatchError as exc:
        print(f"bq-audit: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import datetime as dt

    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    from .client import make_client
    from .integrity import verify
    from .provision import table_id

    settings = _settings_from(args)
    client = make_client(settings)
    full = table_id(client, settings)
    sql = f"SELECT * FROM `{full}` WHERE chain_id IS NOT NULL"
    params = []
    if args.since:
        try:
            since = dt.date.fromisoformat(args.since)
        except ValueError:
            print(f"bq-audit: --since wants a date like 2026-11-25, got {args.since!r}",
                  file=sys.stderr)  # fmt: skip
            return 2
        sql += " AND timestamp >= TIMESTAMP(@since)"
        params.append(bigquery.ScalarQueryParameter("since", "DATE", since))
    config = bigquery.QueryJobConfig(query_parameters=params)
    try:
        rows = [dict(r) for r in client.query(sql, job_config=config, job_retry=None,
                                              timeout=60).result(timeout=600)]  # fmt: skip
    except NotFound as exc:
        print(f"bq-audit: table {full} not found ({exc.message}); hint: bq-audit init",
              file=sys.stderr)  # fmt: skip
        return 2
    report = verify(rows, from_start=args.since is None)
    for chain_id, count in report.rows.items():
        bad = sum(1 for f in report.findings if f.chain_id == chain_id)
        print(f"chain {chain_id}: {count} rows, {'ok' if not bad else f'{bad} finding(s)'}")
    for finding in report.findings:
        print(f"  {finding}")
    total = sum(report.rows.values())
    print(f"verified {total} rows in {len(report.rows)} chain(s) of {full}: "
          f"{len(report.findings)} finding(s)")  # fmt: skip
    return 0 if report.ok else 1


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


def _add_destination(parser: argparse.ArgumentParser) -> None:
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
    rep.add_argument("--endpoint", help="local BigQuery at HOST:PORT (else the env / ADC)")
    _add_destination(rep)
    rep.add_argument("--spool-dir", help="spool root (default: user cache dir)")
    rep.set_defaults(func=_cmd_replay)

    ini = add(
        "init",
        "Create the dataset, table and views if missing; add columns an older table lacks.",
        "bq-audit init --project my-project --retention-days 400 --labels team=ml",
    )
    ini.add_argument("--endpoint", help="local BigQuery at HOST:PORT (else the env / ADC)")
    _add_destination(ini)
    ini.add_argument("--location", help="dataset location (default: US)")
    ini.add_argument("--retention-days", type=int, help="partition expiration (default: none)")
    ini.add_argument("--labels", help="extra labels, key=value,key=value")
    ini.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    ini.set_defaults(func=_cmd_init)

    ver = add(
        "verify",
        "Check the table's hash chains: deleted rows (missing seq), edited rows, broken "
        "links. Exit code 1 on any finding.",
        "bq-audit verify --since 2026-11-01",
    )
    ver.add_argument("--endpoint", help="local BigQuery at HOST:PORT (else the env / ADC)")
    _add_destination(ver)
    ver.add_argument("--since", help="only rows from this date (YYYY-MM-DD) on")
    ver.set_defaults(func=_cmd_verify)

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


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EmulatorError as exc:
        print(f"bq-audit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
