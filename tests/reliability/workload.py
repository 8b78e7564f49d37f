"""Shared by the crash test, the load test and benchmarks/load_test.py: coordinator
processes started on a free loopback port (forked from a warm parent, or plain uvicorn),
and an endless supply of distinct valid packages."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import load, save

from protocol.segments import FileLayout, PackageLayout, cut_file
from tests.reliability.fuzzing import read_package

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Launcher:
    """Starts coordinator processes: forked from a warm parent, or as plain uvicorn."""

    def __init__(self, settings: dict[str, object], env: dict[str, str], fork: bool = True) -> None:
        self.settings = settings
        self.env = env
        self.plain: subprocess.Popen[bytes] | None = None
        self.fork_server: subprocess.Popen[str] | None = None
        if fork:
            self.fork_server = shared_fork_server()

    def start_forked(self, port: int) -> int:
        """A child of the fork server with these settings and this environment (the fork
        server is shared and started once, so variables set since, such as the AWS ones
        of an object-storage test, reach the child only this way)."""
        assert self.fork_server is not None
        assert self.fork_server.stdin is not None and self.fork_server.stdout is not None
        command = {"port": port, "settings": self.settings, "environ": self.env}
        self.fork_server.stdin.write(json.dumps(command) + "\n")
        self.fork_server.stdin.flush()
        return int(self.fork_server.stdout.readline())

    def start_plain(self, port: int) -> int:
        """`python -m uvicorn --factory coordinator.core.app:create_app`, settings from env."""
        command = [sys.executable, "-m", "uvicorn", "--factory", "coordinator.core.app:create_app"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        self.plain = subprocess.Popen(command, cwd=ROOT, env=self.env)
        return self.plain.pid

    def kill(self, pid: int) -> None:
        assert pid > 1, pid  # never a process group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if self.plain is not None and self.plain.pid == pid:
            self.plain.wait(timeout=30)
            self.plain = None
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the fork server reaps it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.005)
        raise AssertionError(f"coordinator process {pid} survived SIGKILL")

    def close(self) -> None:
        """Stop a plain process still running (the shared fork server stays)."""
        if self.plain is not None:
            self.plain.kill()
            self.plain.wait(timeout=30)
            self.plain = None


_fork_server: subprocess.Popen[str] | None = None


def shared_fork_server() -> subprocess.Popen[str]:
    """One fork server per test process: its imports (torch among them) are paid once."""
    global _fork_server
    if _fork_server is None or _fork_server.poll() is not None:
        _fork_server = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.forkserver"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert _fork_server.stdout is not None
        assert _fork_server.stdout.readline().strip() == "ready"
        atexit.register(_stop_fork_server, _fork_server)
    return _fork_server


def _stop_fork_server(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    process.kill()
    process.wait(timeout=30)


def wait_healthy(base_url: str, pid: int, timeout: float = 60) -> float:
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/api/v1/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise AssertionError("the coordinator process exited during start-up") from None
        time.sleep(0.01)
    raise AssertionError(f"the coordinator did not answer within {timeout} s")


class Packages:
    """Distinct valid packages, cheaply: the same expert with slightly moved gates and B."""

    def __init__(self, directory: Path) -> None:
        self.base = read_package(directory)
        self.router = load(self.base["router.safetensors"])
        self.adapter = load(self.base["adapter_model.safetensors"])
        self.count = 0
        self.rng = np.random.default_rng(0)

    def next(self) -> dict[str, bytes]:
        self.count += 1
        router = {
            k: v + self.rng.normal(0, 1e-3, v.shape).astype(v.dtype) for k, v in self.router.items()
        }
        adapter = {
            k: (v + self.rng.normal(0, 1e-4, v.shape).astype(v.dtype)) if "lora_B" in k else v
            for k, v in self.adapter.items()
        }
        return {
            **self.base,
            "router.safetensors": save(router),
            "adapter_model.safetensors": save(adapter),
        }


def delta_body(
    base_url: str, headers: dict[str, str], files: dict[str, bytes], scratch: Path
) -> list[tuple[bytes, bytes | None, bytes]]:
    """The multipart parts of a delta upload of `files`, as `phatgoose client push` sends
    it: asks the coordinator which segments it lacks (`POST /api/v1/blobs/missing`), then
    describes every safetensors file by its layout and sends only those segments."""
    scratch.mkdir(parents=True, exist_ok=True)
    cuts = {}
    for name, data in files.items():
        (scratch / name).write_bytes(data)
        cuts[name] = cut_file(scratch / name)
    asked = [
        s.sha256
        for name, cut in cuts.items()
        if name.endswith(".safetensors")
        for s in cut.segments
    ]
    reply = httpx.post(
        f"{base_url}/api/v1/blobs/missing", headers=headers, json={"sha256": asked}, timeout=30
    )
    reply.raise_for_status()
    missing = set(reply.json()["missing"])
    parts: list[tuple[bytes, bytes | None, bytes]] = []
    layout = {}
    for name, data in files.items():
        cut = cuts[name]
        if not name.endswith(".safetensors"):
            parts.append((b"files", name.encode(), data))
            continue
        layout[name] = FileLayout.of(cut)
        offset = 0
        for segment in cut.segments:
            if segment.sha256 in missing:
                missing.discard(segment.sha256)  # once, though two files share it
                parts.append(
                    (b"segments", segment.sha256.encode(), data[offset : offset + segment.size])
                )
            offset += segment.size
    parts.append(
        (b"layout", b"layout.json", PackageLayout(files=layout).model_dump_json().encode())
    )
    return parts
