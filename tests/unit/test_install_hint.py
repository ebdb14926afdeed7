"""What a user on each Python is told when the embedded BigQuery is not there."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from langchain_bq_audit.emulator import install_hint


def test_the_hint_says_plainly_which_python_the_embedded_bigquery_needs() -> None:
    assert "runs on Python 3.13 only and this is Python 3.11" in install_hint((3, 11))
    assert "--endpoint http://HOST:PORT" in install_hint((3, 10))
    assert "3.13 only" not in install_hint((3, 13))
    assert "pip install 'langchain-bq-audit[local]'" in install_hint((3, 13))


@pytest.mark.skipif(
    importlib.util.find_spec("local_bigquery") is not None,
    reason="this Python has the embedded BigQuery (3.13 with the local extra)",
)
def test_demo_without_the_embedded_bigquery_is_one_line_naming_this_python(tmp_path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "PATH": os.path.dirname(sys.executable)}
    env.pop("BIGQUERY_EMULATOR_HOST", None)
    done = subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", "demo"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""  # no "starting the embedded BigQuery" before it
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if here != "3.13":
        assert f"runs on Python 3.13 only and this is Python {here}" in lines[0]
    assert "--endpoint" in lines[0]
