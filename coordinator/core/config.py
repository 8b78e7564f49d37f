"""Coordinator settings, read from `PHATGOOSE_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, computed_field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator.storage.urls import parse_s3_url
from protocol.limits import AdmissionLimits

log = logging.getLogger(__name__)


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
    blob_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix stores blobs in S3-compatible object storage; "
        "endpoint, region and credentials come from the usual AWS environment "
        "(AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_DEFAULT_REGION, profiles). Default: the folder <data_dir>/blobs (zero set-up).",
    )
    stale_temp_seconds: float = Field(
        default=600.0,
        ge=0,
        description="At start-up, temp files older than this are removed. Keep it above the "
        "longest upload when several processes share the data directory.",
    )
    public_read: bool = Field(
        default=True,
        description="Catalog reads without a token; writes always need one. When off, any "
        "valid token (a contributor's too) reads the whole catalog.",
    )
    # Per-namespace quotas on contributors' uploads (maintainers are exempt): 403
    # quota_exceeded past them.
    max_versions_per_expert: int = Field(
        default=1000, ge=1, description="Versions one expert may have (yanked ones count)."
    )
    max_experts_per_namespace: int = Field(
        default=1000, ge=1, description="Experts one namespace may have."
    )
    max_namespace_bytes: int = Field(
        default=100 * 2**30,
        ge=1,
        description="Package bytes one namespace may store (yanked versions count).",
    )
    auto_migrate: bool = Field(
        default=True, description="Migrate the database to the newest schema at start-up."
    )
    tasks_dir: Path | None = Field(
        default=None,
        description="Evaluation workers read BIG-bench tasks from <tasks_dir>/<task>/task.json; "
        "default: the bigbench==1.0.0 task files, fetched once into the phatgoose cache.",
    )
    auto_credit_max_experts: int = Field(
        default=8,
        ge=0,
        le=1000,
        description="When an evaluation of a release with at most this many experts is "
        "queued, its leave-one-out evaluations (each expert's credit) are queued on the same "
        "spec too: N more evaluations for N experts. 0 turns it off.",
    )
    token_prefix: str = Field(default="phg", pattern=r"^[a-z]{1,8}$")
    rate_limit_enabled: bool = Field(
        default=False,
        description="Token buckets on every path: one per remote address, and one per "
        "verified token (else the address's anonymous one); over a limit is 429 with "
        "Retry-After. Off for local use; turn it on when the coordinator listens beyond "
        "loopback (docs/security.md).",
    )
    rate_limit_per_minute: float = Field(
        default=600.0, gt=0, description="Refill rate of a token's (or anonymous) bucket."
    )
    rate_limit_burst: int = Field(
        default=120, ge=1, description="Size of a token's (or anonymous) bucket."
    )
    rate_limit_address_per_minute: float = Field(
        default=1200.0,
        gt=0,
        description="Refill rate of a remote address's bucket, charged by every request "
        "(pages and images too) whatever its token.",
    )
    rate_limit_address_burst: int = Field(
        default=240, ge=1, description="Size of a remote address's bucket."
    )
    rate_limit_max_clients: int = Field(
        default=10_000, ge=1, description="Buckets kept (least recently used forgotten)."
    )
    max_request_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        description="Largest body of any request but a package upload (which has the "
        "admission limits): over it is 413, from Content-Length or while streaming.",
    )
    log_level: str = "INFO"
    admission: AdmissionLimits = Field(
        default_factory=AdmissionLimits,
        description="Bounds every package must stay within; uploads are cut off while "
        "streaming as soon as a file passes its size limit.",
    )

    @field_validator("blob_url")
    @classmethod
    def _blob_url_names_a_bucket(cls, url: str | None) -> str | None:
        if not url:
            return None  # an empty PHATGOOSE_BLOB_URL means the local folder
        parse_s3_url(url)  # a ValueError says what is wrong with it
        return url

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
        """Create the data directory and its folders readable by this user only (0700);
        warn about an existing one that others can read (its blobs, database, tokens'
        hashes)."""
        local_blobs = () if self.blob_url else (self.blob_dir,)
        for directory in (self.data_dir, *local_blobs, self.upload_tmp_dir):
            if not directory.exists():
                directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
                directory.chmod(PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask
        warn_if_readable_by_others(self.data_dir)


# The data directory holds every blob, the SQLite database and the tokens' hashes.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def warn_if_readable_by_others(path: Path) -> bool:
    """Log a warning when group or others may read or enter `path`; True if so."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return False
    if not mode & 0o077:
        return False
    log.warning(
        "%s is readable by group or others (mode %s): run 'chmod go-rwx %s' so that only the "
        "coordinator's user can read its blobs and database",
        path,
        oct(mode),
        path,
    )
    return True
