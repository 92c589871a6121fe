"""Loopback servers for remote-storage tests: files over HTTP with Range support (and a fake
Hugging Face Hub on top of it). They count what they send, so tests measure bytes on the wire."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

SHA = "0123456789abcdef0123456789abcdef01234567"


SEND_PIECE = 1 << 20


@dataclass
class Fault:
    """One fault a :class:`FileServer` injects into the next request it matches.

    ``kind``: ``status`` (answer ``status``, with ``Retry-After: retry_after`` when given),
    ``cut`` (announce the whole range, send ``fraction`` of it, close), ``reset`` (close with a
    TCP reset before answering), ``stall`` (wait ``seconds``, then answer). ``before`` runs first
    (e.g. to rewrite the file). Only ranged GETs match unless ``ranged`` is False.
    """

    kind: str
    status: int = 503
    retry_after: str | None = None
    fraction: float = 0.5
    seconds: float = 0.0
    path: str = ""
    ranged: bool = True
    method: str = "GET"
    before: Callable[[], None] | None = None


class FileServer:
    """Serves ``root`` on 127.0.0.1 with single-range ``Range`` support.

    ``status`` maps a path regex to a forced status (403, 404 …); ``ranges=False`` makes the server
    ignore ``Range`` (answers 200 with the whole file); ``delay`` seconds before each GET answer.
    ``sent`` counts body bytes sent; ``requests`` lists ``(method, path, range)``. ``faults``
    (a list of :class:`Fault`, consumed in order) are injected into the requests they match;
    ``injected`` lists those that were.
    """

    def __init__(self, root: Path, *, ranges: bool = True, status: dict | None = None,
                 delay: float = 0.0, faults: list[Fault] | None = None) -> None:
        self.root = Path(root)
        self.ranges = ranges
        self.status = status or {}
        self.delay = delay
        self.faults = list(faults or [])
        self.injected: list[Fault] = []
        self.sent = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self) -> None:
        with self._lock:
            self.sent, self.requests = 0, []

    def take_fault(self, method: str, path: str, ranged: bool) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self.faults):
                if (fault.method == method and (ranged or not fault.ranged)
                        and re.search(fault.path, path)):
                    self.injected.append(self.faults.pop(i))
                    return fault
        return None

    def route(self, method: str, path: str, handler: BaseHTTPRequestHandler) -> bool:
        """Hook for subclasses (the fake Hub's API); True when answered."""
        return False

    def file_for(self, path: str) -> Path | None:
        file = self.root / unquote(path).lstrip("/")
        return file if file.is_file() and self.root in file.resolve().parents else None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _answer(self, head: bool) -> None:
                path = urlsplit(self.path).path
                with server._lock:
                    server.requests.append((self.command, path, self.headers.get("Range")))
                fault = server.take_fault(self.command, path, bool(self.headers.get("Range")))
                cut = None
                if fault is not None:
                    if fault.before is not None:
                        fault.before()
                    if fault.kind == "status":
                        extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                        return self.send_json({"error": "injected"}, fault.status, extra)
                    if fault.kind == "reset":
                        return self.reset()
                    if fault.kind == "stall":
                        time.sleep(fault.seconds)
                    if fault.kind == "cut":
                        cut = fault.fraction
                for pattern, code in server.status.items():
                    if re.search(pattern, path):
                        return self.send_json({"error": "forced"}, code)
                if server.route(self.command, path, self):
                    return
                file = server.file_for(path)
                if file is None:
                    return self.send_json({"error": "not found"}, 404)
                self.send_file(file, head, cut=cut)

            def reset(self) -> None:
                """Close with a TCP reset (SO_LINGER 0) instead of an answer."""
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()

            def send_json(self, obj, code: int = 200, headers: dict | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def send_file(self, file: Path, head: bool, headers: dict | None = None,
                          cut: float | None = None) -> None:
                data = file.read_bytes()
                start, stop, code = 0, len(data), 200
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if match and server.ranges:
                    start = int(match.group(1))
                    stop = min(len(data), int(match.group(2)) + 1 if match.group(2) else len(data))
                    code = 206
                if not head and server.delay:
                    time.sleep(server.delay)
                self.send_response(code)
                self.send_header("Content-Length", str(stop - start))
                self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if head:
                    return
                body = memoryview(data)[start:stop]
                if cut is not None:  # a body cut mid-way: part of it, then the connection ends
                    self.close_connection = True
                    self.wfile.write(body[:int(len(body) * cut)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                # In pieces, each counted once written: a client that stops reading and closes
                # ends the answer, and `sent` then counts what left before (plus socket buffers).
                for at in range(0, len(body), SEND_PIECE):
                    piece = body[at:at + SEND_PIECE]
                    try:
                        self.wfile.write(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    with server._lock:
                        server.sent += len(piece)

            def do_GET(self) -> None:
                self._answer(head=False)

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.body = self.rfile.read(length)
                self._answer(head=False)

        return Handler


class FakeHub(FileServer):
    """The three endpoints ``HfFileSystem`` reads through, for repos laid out as
    ``root/<org>/<name>/<files>`` at one revision (``main`` → :data:`SHA`)."""

    def _repo_file(self, repo: str, name: str) -> Path | None:
        return self.file_for(f"{repo}/{name}")

    def _tree(self, repo: str, sub: str = "") -> list[dict]:
        folder = self.root / repo / sub
        out = []
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            rel = str(p.relative_to(self.root / repo))
            if p.is_dir():
                out.append({"type": "directory", "oid": SHA, "size": 0, "path": rel})
            else:
                out.append({"type": "file", "oid": SHA, "size": p.stat().st_size, "path": rel})
        return out

    def route(self, method: str, path: str, handler) -> bool:
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            if not (self.root / m.group(1)).is_dir():
                handler.send_json({"error": "Repository not found"}, 404,
                                  {"X-Error-Code": "RepoNotFound"})
            else:
                handler.send_json({"id": m.group(1), "modelId": m.group(1), "sha": SHA,
                                   "siblings": [{"rfilename": t["path"]}
                                                for t in self._tree(m.group(1))]})
            return True
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            handler.send_json(self._tree(m.group(1), unquote(m.group(3) or "")))
            return True
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", path)
        if m:
            wanted = json.loads(handler.body or b"{}").get("paths", [])
            if not wanted:
                form = dict(kv.split("=", 1) for kv in handler.body.decode().split("&") if kv)
                wanted = [unquote(form.get("paths", ""))]
            info = [t for t in self._tree(m.group(1)) if t["path"] in wanted]
            handler.send_json(info)
            return True
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            file = self._repo_file(m.group(1), m.group(3))
            if file is None:
                handler.send_json({"error": "Entry not found"}, 404,
                                  {"X-Error-Code": "EntryNotFound"})
            else:
                handler.send_file(file, method == "HEAD", {"X-Repo-Commit": SHA})
            return True
        return False
