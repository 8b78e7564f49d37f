"""Coordinator settings, read from `PHATGOOSE_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.limits import AdmissionLimits


class Settings(BaseSettings):
    """Everything the coordinator needs; the defaults start it with zero set-up.

    Nested admission limits are set with a double underscore, e.g.
    `PHATGOOSE_ADMISSION__MAX_RANK=64`.
    """

    model_config = SettingsConfigDict(
        env_prefix="PHATGOOSE_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Field(
        default=Path(".phatgoose/coordinator"),
        description="Holds the SQLite file (when no database URL is given), blobs and temp files.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db for multi-user "
        "deployments; default: a SQLite file in the data directory.",
    )
    stale_temp_seconds: float = Field(
        default=600.0,
        ge=0,
        description="At start-up, temp files older than this are removed. Keep it above the "
        "longest upload when several processes share the data directory.",
    )
    public_read: bool = Field(
        default=True, description="Catalog reads without a token; writes always need one."
    )
    auto_migrate: bool = Field(
        default=True, description="Migrate the database to the newest schema at start-up."
    )
    tasks_dir: Path | None = Field(
        default=None,
        description="Evaluation workers read BIG-bench tasks from <tasks_dir>/<task>/task.json; "
        "default: the bigbench==1.0.0 task files, fetched once into the phatgoose cache.",
    )
    token_prefix: str = Field(default="phg", pattern=r"^[a-z]{1,8}$")
    rate_limit_enabled: bool = Field(
        default=False,
        description="Token bucket per client (token id, else remote address) on /api/: "
        "over the limit is 429 with Retry-After. Off for local use; turn it on when the "
        "coordinator listens beyond loopback (docs/security.md).",
    )
    rate_limit_per_minute: float = Field(default=600.0, gt=0, description="Refill rate.")
    rate_limit_burst: int = Field(default=120, ge=1, description="Bucket size.")
    rate_limit_max_clients: int = Field(
        default=10_000, ge=1, description="Buckets kept (least recently used forgotten)."
    )
    log_level: str = "INFO"
    admission: AdmissionLimits = Field(
        default_factory=AdmissionLimits,
        description="Bounds every package must stay within; uploads are cut off while "
        "streaming as soon as a file passes its size limit.",
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'coordinator.sqlite').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def upload_tmp_dir(self) -> Path:
        """Uploads are streamed here first: inside the data directory, so storing a blob
        never crosses a file system."""
        return self.data_dir / "tmp"

    def ensure_dirs(self) -> None:
        for directory in (self.data_dir, self.blob_dir, self.upload_tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
