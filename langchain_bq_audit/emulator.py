"""Start and stop the embedded local BigQuery (`local-bigquery`) on the loopback interface.

The server needs Python 3.13 and three DuckDB extensions, which DuckDB only looks for under
`$HOME/.duckdb/extensions`; so the server runs with `HOME` set to a folder of ours where the
extensions are installed once from the offline wheels (see shared/EMULATOR.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

EXTENSIONS = ("icu", "ducklake", "spatial")
_ELSEWHERE = (
    "or point at a BigQuery you have: --endpoint http://HOST:PORT (BIGQUERY_EMULATOR_HOST) "
    "for another emulator, --project for real BigQuery"
)


def install_hint(version: tuple[int, int] = sys.version_info[:2]) -> str:
    """How to get the embedded BigQuery on this Python: local-bigquery runs on 3.13 only,
    so on any other version the `local` extra installs nothing and the hint says so."""
    if version[:2] == (3, 13):
        return f"install it with: pip install 'langchain-bq-audit[local]', {_ELSEWHERE}"
    here = f"{version[0]}.{version[1]}"
    return (
        f"the embedded BigQuery (local-bigquery) runs on Python 3.13 only and this is "
        f"Python {here}, where the 'local' extra installs nothing: make a Python 3.13 "
        f"environment (python3.13 -m venv .venv && .venv/bin/pip install "
        f"'langchain-bq-audit[local]'), {_ELSEWHERE}"
    )


INSTALL_HINT = install_hint()


class EmulatorError(RuntimeError):
    """The local BigQuery could not be started or did not answer."""


class EmulatorNotInstalledError(EmulatorError):
    """`local-bigquery` is not installed in this environment."""


def _user_dir(env_var: str, default: str) -> Path:
    base = os.environ.get(env_var) or os.path.join(os.path.expanduser("~"), default)
    return Path(base) / "langchain-bq-audit"


def default_data_dir() -> Path:
    """Where the emulator keeps its tables unless told otherwise."""
    override = os.environ.get("BQ_AUDIT_EMULATOR_DATA_DIR")
    if override:
        return Path(override)
    return _user_dir("XDG_DATA_HOME", ".local/share") / "local-bigquery"


def default_extension_home() -> Path:
    """The folder used as the server's HOME, holding `.duckdb/extensions`."""
    return _user_dir("XDG_CACHE_HOME", ".cache") / "duckdb-home"


def find_server() -> Path:
    """The `local-bigquery` executable: beside this Python first, then on PATH."""
    beside = Path(sys.executable).parent / "local-bigquery"
    if beside.exists():
        return beside
    found = shutil.which("local-bigquery")
    if found:
        return Path(found)
    raise EmulatorNotInstalledError(f"local-bigquery was not found; {INSTALL_HINT}")


def _server_python(server: Path) -> str:
    """The interpreter the server script runs with (it has the DuckDB wheels)."""
    try:
        first = server.read_text(errors="replace").split("\n", 1)[0]
    except OSError:
        return sys.executable
    if first.startswith("#!") and "python" in first:
        return first[2:].strip().split()[0]
    return sys.executable


def ensure_extensions(home: Path, python: str) -> None:
    """Install the DuckDB extensions the server needs into `home`, once."""
    root = home / ".duckdb" / "extensions"
    if all(any(root.glob(f"*/*/{name}.duckdb_extension")) for name in EXTENSIONS):
        return
    home.mkdir(parents=True, exist_ok=True)
    code = (
        "import duckdb_extensions as d\n"
        f"for name in {EXTENSIONS!r}:\n"
        "    d.import_extension(name)\n"
    )
    env = {**os.environ, "HOME": str(home)}
    try:
        proc = subprocess.run(
            [python, "-c", code], env=env, capture_output=True, text=True, timeout=180
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulatorError(f"could not install DuckDB extensions into {home}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise EmulatorError(
            f"could not install DuckDB extensions into {home}: {' '.join(tail)}; {INSTALL_HINT}"
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalBigQuery:
    """A `local-bigquery` server process on 127.0.0.1.

    Example::

        with LocalBigQuery() as bq:
            client = bq.client()
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        project: str = "local",
        host: str = "127.0.0.1",
        port: int | None = None,
        grpc_port: int | None = None,
        extension_home: str | os.PathLike[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.project = project
        self.host = host
        self.port = port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.extension_home = Path(extension_home) if extension_home else default_extension_home()
        self.log_path = self.data_dir / "local-bigquery.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The REST endpoint, e.g. `http://127.0.0.1:9050`."""
        return f"http://{self.host}:{self.port}"

    @property
    def host_port(self) -> str:
        """`host:port`, the form `BIGQUERY_EMULATOR_HOST` takes."""
        return f"{self.host}:{self.port}"

    @property
    def grpc_target(self) -> str:
        """`host:grpc_port` of the Storage Write API."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 60.0) -> LocalBigQuery:
        """Start the server and wait until it serves queries; raise `EmulatorError` if not."""
        if self.running:
            return self
        server = find_server()
        ensure_extensions(self.extension_home, _server_python(server))
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmulatorError(f"cannot use {self.data_dir} as the data directory: {exc}") from exc
        cmd = [
            str(server), "serve",
            "--host", self.host,
            "--port", str(self.port),
            "--grpc-port", str(self.grpc_port),
            "--data-dir", str(self.data_dir),
            "--project", self.project,
        ]  # fmt: skip
        env = {**os.environ, "HOME": str(self.extension_home)}
        try:
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
        except OSError as exc:
            raise EmulatorError(f"cannot start {server}: {exc}") from exc
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.endpoint}/bigquery/v2/projects/{self.project}/datasets"
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmulatorError(
                    f"local-bigquery exited with code {self._proc.returncode}: {self._log_tail()}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=2) as resp,
            ):
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise EmulatorError(
                    f"local-bigquery did not answer on {self.endpoint} within {timeout:.0f} s; "
                    f"log: {self.log_path}"
                )
            time.sleep(0.1)
        self._probe_query(max(5.0, deadline - time.monotonic()))

    def _probe_query(self, timeout: float) -> None:
        """A real query: a missing DuckDB extension only shows up here, as HTTP 400."""
        url = f"{self.endpoint}/bigquery/v2/projects/{self.project}/queries"
        body = json.dumps({"query": "SELECT 1", "useLegacySql": False}).encode()
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            missing = [name for name in EXTENSIONS if name in detail.lower()]
            hint = (
                f"DuckDB extension {', '.join(missing)} is missing under {self.extension_home}"
                if missing
                else "see the log"
            )
            raise EmulatorError(
                f"local-bigquery answered {exc.code} to a test query ({hint}): {detail}"
            ) from exc

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after `timeout`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def client(self, project: str | None = None) -> Any:
        """A `google.cloud.bigquery.Client` for this server (anonymous credentials)."""
        from .client import make_client
        from .settings import AuditSettings

        return make_client(
            AuditSettings(project=project or self.project, emulator_host=self.endpoint)
        )

    def __enter__(self) -> LocalBigQuery:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
