"""Concurrent uploads over real HTTP: nothing lost, versions numbered without gaps."""

from __future__ import annotations

import select
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from coordinator.auth.models import Role
from tests.coordinator.helpers import bearer_headers, live_server, package_parts

UPLOADS = 8


@pytest.mark.slow
def test_concurrent_uploads_of_one_name_get_versions_one_to_n(app, alice, package):
    directories = [package("alice/busy", seed=seed) for seed in range(UPLOADS)]

    with live_server(app) as url:

        def send(directory):
            with httpx.Client(base_url=url, timeout=120) as http:
                return http.post("/api/v1/experts", headers=alice, files=package_parts(directory))

        with ThreadPoolExecutor(max_workers=UPLOADS) as pool:
            responses = list(pool.map(send, directories))
        listing = httpx.get(f"{url}/api/v1/experts/alice/busy", timeout=30).json()

    assert [r.status_code for r in responses] == [201] * UPLOADS, [r.text for r in responses]
    assert sorted(r.json()["version"] for r in responses) == list(range(1, UPLOADS + 1))
    assert [v["version"] for v in listing["versions"]] == list(range(1, UPLOADS + 1))
    digests = {r.json()["package_digest"]: r.json()["version"] for r in responses}
    assert {v["package_digest"]: v["version"] for v in listing["versions"]} == digests


@pytest.mark.slow
def test_concurrent_identical_uploads_store_one_version(app, alice, package):
    directory = package("alice/same")

    with live_server(app) as url:

        def send(_):
            with httpx.Client(base_url=url, timeout=120) as http:
                return http.post("/api/v1/experts", headers=alice, files=package_parts(directory))

        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = sorted(r.status_code for r in pool.map(send, range(4)))
        listing = httpx.get(f"{url}/api/v1/experts/alice/same", timeout=30).json()

    assert statuses == [201, 409, 409, 409]
    assert [v["version"] for v in listing["versions"]] == [1]


def _send_endless_upload(
    url: str, headers: dict[str, str], give_up_after: int
) -> tuple[bytes, int]:
    """POST a chunked multipart body that never ends; return (response head, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "endless"
    head = (
        f"POST /api/v1/experts HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: {headers['Authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    part_head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
        'filename="adapter_model.safetensors"\r\n\r\n'
    ).encode()
    chunk = b"\0" * 16384
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n" % (len(part_head), part_head))
        while sent < give_up_after:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break  # the server closed the connection after answering
            sent += len(chunk)
        sock.settimeout(30)
        return sock.recv(65536), sent


def test_upload_over_the_limit_is_cut_off_while_streaming(make_app, settings, tiny_base):
    limit = 200_000
    limited = settings.model_copy(
        update={"admission": settings.admission.model_copy(update={"max_adapter_bytes": limit})}
    )
    application = make_app(limited)
    headers = bearer_headers(application, "alice", Role.CONTRIBUTOR)

    with live_server(application) as url:
        response, sent = _send_endless_upload(url, headers, give_up_after=200 * limit)

    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"adapter_model.safetensors is larger than 200000 bytes" in response
    # Cut off near the limit (plus what sat in socket buffers), not at the end of the body.
    assert sent < 50 * limit
    assert list(limited.upload_tmp_dir.iterdir()) == []
