"""Settings come from PHATGOOSE_* environment variables."""

from __future__ import annotations

from pathlib import Path

from coordinator.core.config import Settings


def test_defaults_need_no_setup(monkeypatch):
    for name in ("PHATGOOSE_DATA_DIR", "PHATGOOSE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.data_dir == Path(".phatgoose/coordinator")
    expected = (Path(".phatgoose/coordinator") / "coordinator.sqlite").resolve()
    assert settings.resolved_database_url == f"sqlite:///{expected}"


def test_environment_sets_data_dir_database_and_admission_limits(monkeypatch, tmp_path):
    monkeypatch.setenv("PHATGOOSE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PHATGOOSE_DATABASE_URL", "postgresql+psycopg://u@db/catalog")
    monkeypatch.setenv("PHATGOOSE_ADMISSION__MAX_RANK", "32")
    monkeypatch.setenv("PHATGOOSE_PUBLIC_READ", "false")

    settings = Settings()

    assert settings.data_dir == tmp_path
    assert settings.resolved_database_url == "postgresql+psycopg://u@db/catalog"
    assert settings.admission.max_rank == 32
    assert settings.public_read is False
