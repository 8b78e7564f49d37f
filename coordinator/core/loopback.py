"""Serving an app on a free loopback port in a thread: for tests, benchmarks and demos that
talk to a real HTTP coordinator inside one process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI


@contextmanager
def serve_on_loopback(app: FastAPI, start_timeout: float = 20.0) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a daemon thread (lifespan off:
    the app is set up already); yield its base URL, stop the server afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the loopback server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
