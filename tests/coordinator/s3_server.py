"""A real S3 API for tests: moto's S3 server on a free loopback port in this process, the
AWS environment pointed at it for one test at a time, and a fresh bucket per test.

A test module uses the fixtures by importing them: `moto_server`, `s3_env`, `s3` and `bucket`
are defined as `<name>_fixture` so that the import does not shadow the test's arguments.
Nothing here reaches AWS: the credentials are moto's dummies, and the AWS config files are
pointed at paths that do not exist so that a developer's own profile cannot leak in.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.storage.s3 import new_client


@pytest.fixture(scope="session", name="moto_server")
def moto_server_fixture() -> Iterator[str]:
    """The endpoint URL of a moto S3 server that lives as long as the test session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # else a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def aws_environment(endpoint: str, home: Path) -> dict[str, str]:
    """The variables that point boto3 at `endpoint` with dummy credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
    }


@pytest.fixture(name="s3_env")
def s3_env_fixture(
    moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, str]:
    """This test's AWS environment, pointing at the moto server (undone afterwards)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    variables = aws_environment(moto_server, tmp_path)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return variables


@pytest.fixture(name="s3")
def s3_fixture(s3_env: dict[str, str]) -> Any:
    """A plain boto3 S3 client on the moto server, to look at and tamper with buckets."""
    return new_client()


@pytest.fixture(name="bucket")
def bucket_fixture(s3: Any) -> str:
    """A new, empty bucket (3-63 characters, unique per test)."""
    name = f"phatgoose-test-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


def objects(s3: Any, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, key -> bytes."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", []):
            found[entry["Key"]] = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
    return found


def unfinished_uploads(s3: Any, bucket: str) -> list[str]:
    """The keys of the bucket's multipart uploads that were neither completed nor aborted."""
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
