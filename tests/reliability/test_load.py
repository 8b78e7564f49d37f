"""A short run of benchmarks/load_test.py: concurrent uploads and catalog reads against a
coordinator process for a few seconds, then one 64 MB upload. Zero errors, and the upload
streams: the server's heap (anonymous RSS) grows by far less than the package."""

from __future__ import annotations

import pytest

from benchmarks.load_test import run
from tests.coordinator.conftest import NO_POSTGRES, POSTGRES_URL


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_short_load_has_no_errors_and_bounded_memory(kind: str) -> None:
    if kind == "postgres" and not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    result = run(
        seconds=3,
        uploaders=2,
        readers=3,
        postgres_url=POSTGRES_URL if kind == "postgres" else None,
        big_mb=64,
        fork=True,
    )
    assert result["errors"] == 0, result["error_samples"]
    operations = result["operations"]
    assert isinstance(operations, dict)
    assert operations["upload"]["count"] >= 2
    assert operations["list"]["count"] >= 2
    big = result["big_upload"]
    assert isinstance(big, dict)
    assert big["status"] == 201
    assert big["rss_anon_growth_mb"] < big["package_mb"] / 2, big
