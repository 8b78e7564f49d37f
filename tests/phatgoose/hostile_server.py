"""A real HTTP server on loopback that answers whatever a test scripts: a coordinator gone
hostile (or a man in the middle), for `load_release`. It records every request it gets,
with its Authorization header, so a test can say where a token went."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from torch import nn

from phatgoose.expert import Expert
from phatgoose.models import model_fingerprint
from protocol import RELEASE_FORMAT, ROUTER_NUMERICS, package_digest

RELEASE_PATH = "/api/v1/releases/1"


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunk_delay: float = 0.0  # seconds between 1-byte chunks (a slow body) when > 0
    declared_length: int | None = None  # a Content-Length that may lie (None: the truth)
    omit_length: bool = False  # no Content-Length: the body ends when the connection does


@dataclass
class Seen:
    path: str
    authorization: str | None


class HostileServer:
    """`replies[path]` is what GET `path` answers (404 otherwise); `seen` lists requests."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.seen: list[Seen] = []
        handler = _handler(self)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def json(self, path: str, value: Any) -> None:
        self.replies[path] = Reply(body=json.dumps(value).encode())


def _handler(server: HostileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.seen.append(Seen(self.path, self.headers.get("Authorization")))
            reply = server.replies.get(self.path, Reply(status=404, body=b"{}"))
            self.send_response(reply.status)
            length = reply.declared_length
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if not reply.omit_length:
                self.send_header(
                    "Content-Length", str(len(reply.body) if length is None else length)
                )
            self.end_headers()
            try:
                if reply.chunk_delay > 0:
                    for byte in reply.body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(reply.chunk_delay)
                else:
                    self.wfile.write(reply.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def hostile_server() -> Iterator[HostileServer]:
    server = HostileServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def serve_release(
    server: HostileServer, experts: list[Expert], base: nn.Module, folder: Path
) -> dict[str, Any]:
    """Serve a valid release of `experts` as a coordinator would; returns the manifest
    (a dict a test may break and serve again with `server.json`)."""
    entries = []
    for expert in experts:
        namespace, name = expert.name.split("/")
        package = expert.save(folder / namespace / name)
        files = []
        for path in sorted(package.iterdir()):
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            url = f"/files/{sha}/{path.name}"
            server.replies[url] = Reply(body=data)
            files.append({"filename": path.name, "sha256": sha, "size": len(data), "url": url})
        entries.append(
            {
                "ref": f"{expert.name}@1",
                "namespace": namespace,
                "name": name,
                "version": 1,
                "package_digest": package_digest({f["filename"]: f["sha256"] for f in files}),
                "files": files,
            }
        )
    manifest = {
        "format": RELEASE_FORMAT,
        "format_version": 2,
        "number": 1,
        "method": "phatgoose",
        "top_k": 1,
        "router_numerics": ROUTER_NUMERICS,
        "base_model": {"name": "tiny", "revision": None, "fingerprint": model_fingerprint(base)},
        "experts": entries,
    }
    server.json(RELEASE_PATH + "/manifest", manifest)
    server.json(RELEASE_PATH, {"number": 1, "withdrawn": False, "yanked_experts": []})
    return manifest
