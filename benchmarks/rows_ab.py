"""Row building, hashing and insertAll encoding: this checkout against another, in one run.

    .venv/bin/python -m benchmarks.rows_ab ../main            # the other checkout's root
    .venv/bin/python -m benchmarks.rows_ab ../main --rows 10000 --rounds 7

The other checkout's package is imported under another name next to this one. Both build
rows from the same captured records (the small chain and the 20 x 2 KB one, see
`benchmarks.run.chains`); the rows must be equal column for column (values and types, in
order) and their canonical forms byte for byte, else it stops. Then it times each step in
CPU time (`time.process_time`, so other load on the machine counts less than in wall
time), the two checkouts alternating round by round, best round of each.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.run import captured_records

OTHER = "other_langchain_bq_audit"


def _load_other(root: Path) -> ModuleType:
    package = root / "langchain_bq_audit"
    spec = importlib.util.spec_from_file_location(
        OTHER, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no langchain_bq_audit package under {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[OTHER] = module
    spec.loader.exec_module(module)
    return module


def _kit(package: str) -> dict[str, Any]:
    def mod(name: str) -> Any:
        return importlib.import_module(f"{package}.{name}")

    return {
        "build_row": mod("rows").build_row,
        "HashChain": mod("integrity").HashChain,
        "canonical": mod("integrity").canonical,
        "request_body": mod("sinks.insert_all").request_body,
        "settings": mod("settings").AuditSettings(),
    }


def _check_equal(this: dict[str, Any], other: dict[str, Any], records: list[Any]) -> None:
    """Same rows from both checkouts, and the same canonical bytes (event ids are given
    once per record, so the second build repeats the first's)."""
    mine = [this["build_row"](r, this["settings"]) for r in records]
    theirs = [other["build_row"](r, other["settings"]) for r in records]
    for a, b in zip(mine, theirs, strict=True):
        if repr(list(a.items())) != repr(list(b.items())):
            raise SystemExit(f"rows differ:\n this  {a!r}\n other {b!r}")
    chain = this["HashChain"]()
    for row in mine:
        chain.link(row)
        if this["canonical"](row) != other["canonical"](row):
            raise SystemExit(f"canonical forms differ: {row!r}")


def _measure(kit: dict[str, Any], records: list[Any]) -> tuple[float, float, float]:
    """CPU seconds to build, to chain and to encode (insertAll bodies of 500 rows)."""
    gc.collect()
    start = time.process_time()
    rows = [kit["build_row"](r, kit["settings"]) for r in records]
    built = time.process_time()
    chain = kit["HashChain"]()
    for row in rows:
        chain.link(row)
    chained = time.process_time()
    for i in range(0, len(rows), 500):
        batch = rows[i : i + 500]
        kit["request_body"](batch, [r["event_id"] for r in batch])
    return built - start, chained - built, time.process_time() - chained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout's root directory")
    parser.add_argument("--rows", type=int, default=10_000, help="small rows (big: a tenth)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kits = {"this": _kit("langchain_bq_audit")}
    _load_other(args.other)
    kits["other"] = _kit(OTHER)
    for name, n in (("small", args.rows), ("20 x 2 KB", max(1, args.rows // 10))):
        records = captured_records(n, name)
        _check_equal(kits["this"], kits["other"], records)
        for kit in kits.values():  # warm: orjson's import, caches
            _measure(kit, records[:200])
        best = {k: (1e9, 1e9, 1e9) for k in kits}
        for i in range(args.rounds):
            for k in list(kits)[:: 1 if i % 2 else -1]:  # the order alternates
                round_ = _measure(kits[k], records)
                best[k] = (min(best[k][0], round_[0]), min(best[k][1], round_[1]),
                           min(best[k][2], round_[2]))  # fmt: skip
        print(f"{name}: {n:,} records, rows and canonical forms equal; best of {args.rounds}")
        for k, (build, chain, encode) in best.items():
            us = [f"{seconds / n * 1e6:.1f} us" for seconds in (build, chain, encode)]
            print(f"  {k:5}  build {us[0]}, hash chain {us[1]}, insertAll JSON {us[2]}: "
                  f"{n / (build + chain + encode):,.0f} rows/s")  # fmt: skip


if __name__ == "__main__":
    main()
