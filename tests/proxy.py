"""A TCP proxy on 127.0.0.1 that injects real network faults between a client and a server.

Modes: `pass` (forward bytes), `reset` (every connection, old and new, is cut with a TCP
RST), `stall` (connections are accepted and read, but nothing is ever answered), and
`http` (every HTTP request is answered with `status`, as BigQuery answers 503, 429 or 403,
on keep-alive connections; `answered` counts them). Switching mode applies to open
connections too, as a real outage would to a pooled keep-alive socket. In `pass` mode,
`refuse(b"...", status)` answers with `status` (or, with None, never answers) each request
whose bytes hold that text: one kind of request fails, say creating views, while the rest
go through.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading


class FaultProxy:
    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", project: str = "local"
    ) -> None:
        self.target = (target_host, target_port)
        self.project = project  # of the BigQuery behind it, for clients through the proxy
        self.mode = "pass"
        self.status = 503
        self.answered = 0  # requests answered with `status` in `http` mode (or refused)
        self.refused: bytes | None = None
        self.refused_status: int | None = 403
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_mode(self, mode: str, status: int = 503) -> None:
        assert mode in ("pass", "reset", "stall", "http")
        self.status = status
        self.mode = mode
        if mode in ("reset", "http"):  # pooled connections must meet the new mode too
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                _reset(conn)

    def refuse(self, marker: bytes | None, status: int | None = 403) -> None:
        """In `pass` mode, answer a request whose bytes hold `marker` with `status`, or with
        `status` None never answer it (a hung request); `marker` None: forward everything
        again. A client sends a small request in one write."""
        self.refused_status, self.refused = status, marker

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _reset(conn)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "reset":
                _reset(client)
                continue
            target = self._answer if self.mode == "http" else self._pipe
            threading.Thread(target=target, args=(client,), daemon=True).start()

    def _answer(self, client: socket.socket) -> None:
        """Read HTTP requests and answer each with `status` and a BigQuery error body."""
        data = b""
        try:
            client.settimeout(30)
            while self.mode == "http" and not self._closing:
                while b"\r\n\r\n" not in data:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(data) < length:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data[length:]
                client.sendall(_error_response(self.status))
                self.answered += 1
        except OSError:
            return
        finally:
            _reset(client)

    def _pipe(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            if self.mode == "pass":
                upstream = socket.create_connection(self.target, timeout=5)
            with self._lock:
                self._conns.add(client)
                if upstream is not None:
                    self._conns.add(upstream)
            while not self._closing and self.mode != "reset":
                if self.mode == "stall" or upstream is None:
                    # read and discard what the client sends; never answer
                    ready, _, _ = select.select([client], [], [], 0.1)
                    if ready and not client.recv(65536):
                        return
                    if self.mode == "pass" and upstream is None:
                        return  # a stalled connection stays dead, like a real hung peer
                    continue
                ready, _, _ = select.select([client, upstream], [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client and self.refused is not None and self.refused in data:
                        self.answered += 1
                        if self.refused_status is not None:
                            client.sendall(_error_response(self.refused_status))
                        continue
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(client)
                if upstream is not None:
                    self._conns.discard(upstream)
            for sock in (client, upstream):
                if sock is not None:
                    _reset(sock)


def _error_response(code: int) -> bytes:
    """An HTTP response with `code` and a BigQuery error body."""
    reason = {403: "accessDenied", 429: "rateLimitExceeded"}.get(code, "backendError")
    body = json.dumps({"error": {"code": code, "message": f"injected {reason}",
                                 "errors": [{"reason": reason}]}}).encode()  # fmt: skip
    head = b"HTTP/1.1 %d Injected\r\nContent-Type: application/json\r\n" % code
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), not a polite FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
