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


def _cmd_schema(args: argparse.Namespace) -> int:
    print(schema.to_markdown() if args.format == "markdown" else schema.to_json())
    return 0


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

    sch = add("schema", "Print the audit table's schema.", "bq-audit schema --format markdown")
    sch.add_argument("--format", choices=("json", "markdown"), default="json")
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
