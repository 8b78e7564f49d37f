"""`phatgoose client push` against a live coordinator on loopback."""

import json

import httpx
import pytest

from client.push import PushRejected, PushUnavailable, RetryPolicy, push_package
from protocol import MANIFEST_FILE
from tests.client.conftest import run_cli
from tests.client.helpers import live_coordinator, marker_hits

NO_WAIT = RetryPolicy(attempts=3, backoff_seconds=0.0)


@pytest.fixture
def coordinator(tmp_path, tiny_base_dir):
    with live_coordinator(tmp_path / "coordinator", tiny_base_dir) as live:
        yield live


class RecordingTransport(httpx.HTTPTransport):
    """Forwards every request to the network and keeps the bytes it sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        head = f"{request.method} {request.url}\n".encode() + b"".join(
            k + b": " + v + b"\n" for k, v in request.headers.raw
        )
        self.sent.append(head + body)
        return super().handle_request(request)


class FlakyTransport(httpx.BaseTransport):
    """Answers the first `failures` requests itself (an exception or a status), then forwards."""

    def __init__(self, failures: list[Exception | int]) -> None:
        self.failures = list(failures)
        self.requests = 0
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            request.read()
            return httpx.Response(failure, json={"detail": {"message": "busy"}})
        return self.inner.handle_request(request)


def test_push_publishes_a_new_version_under_the_tokens_namespace(coordinator, trained_package):
    result = run_cli(
        "push",
        trained_package,
        "--coordinator",
        coordinator.url,
        "--token",
        coordinator.token,
        "--quiet",
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "alice/quokka@1"


def test_no_request_body_carries_the_training_text(coordinator, trained_package, private_data):
    assert marker_hits(private_data.read_bytes())  # the scan finds them where they are
    transport = RecordingTransport()

    version = push_package(
        trained_package, coordinator.url, coordinator.token, transport=transport, progress=False
    )

    assert version["ref"] == "alice/quokka@1"
    # The question which tensors the coordinator lacks, then the package itself.
    assert len(transport.sent) == 2 and b"/blobs/missing" in transport.sent[0]
    assert sum(len(b) for b in transport.sent) > 10_000
    assert marker_hits(b"".join(transport.sent)) == []


def test_a_rejection_is_reported_with_its_check_and_file_and_not_retried(
    coordinator, trained_package, tmp_path
):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in trained_package.iterdir():
        (tampered / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((tampered / MANIFEST_FILE).read_text())
    manifest["lora"]["r"] = 3
    (tampered / MANIFEST_FILE).write_text(json.dumps(manifest))
    transport = FlakyTransport([])

    with pytest.raises(PushRejected) as caught:
        push_package(
            tampered,
            coordinator.url,
            coordinator.token,
            transport=transport,
            retry=NO_WAIT,
            progress=False,
        )

    assert transport.requests == 2  # the question which tensors are missing, one upload
    assert caught.value.status_code == 422
    assert caught.value.detail["file"] == MANIFEST_FILE
    assert "check: " in caught.value.report()


def test_the_cli_prints_the_rejection_and_exits_1(coordinator, trained_package):
    run_cli(
        "push",
        trained_package,
        "--coordinator",
        coordinator.url,
        "--token",
        coordinator.token,
        "--quiet",
    )

    again = run_cli(
        "push",
        trained_package,
        "--coordinator",
        coordinator.url,
        "--token",
        coordinator.token,
        "--quiet",
    )

    assert again.exit_code == 1
    assert "rejected (409 conflict)" in again.output
    assert "alice/quokka@1" in again.output  # the existing version it duplicates


def test_connection_errors_and_503_are_retried_until_the_upload_lands(coordinator, trained_package):
    transport = FlakyTransport([httpx.ConnectError("refused"), 503])
    waits: list[float] = []

    version = push_package(
        trained_package,
        coordinator.url,
        coordinator.token,
        transport=transport,
        retry=RetryPolicy(attempts=3, backoff_seconds=0.5),
        progress=False,
        sleep=waits.append,
    )

    assert version["version"] == 1
    assert transport.requests == 4  # the question: refused, 503, answered; then the upload
    assert waits == [0.5, 1.0]  # exponential backoff


def test_giving_up_after_the_last_attempt_says_why(trained_package):
    transport = FlakyTransport([httpx.ConnectError("refused")] * 3)

    with pytest.raises(PushUnavailable, match="after 3 attempts; last: ConnectError"):
        push_package(
            trained_package,
            "http://127.0.0.1:9",
            "t",
            transport=transport,
            retry=NO_WAIT,
            progress=False,
        )
