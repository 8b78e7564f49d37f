"""Where blobs live when they are not in the data directory: `s3://bucket/prefix`.

Parsed here, without boto3, so that settings are validated (and the local default starts)
without importing the S3 client. The rules are the ones S3 itself applies to bucket names,
plus a deliberately plain prefix: segments of letters, digits, `.`, `_` and `-`, so that a
key never holds an empty, `.` or `..` segment that tools would read as a path step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_PREFIX_CHARS = 512  # S3 keys hold 1024 bytes; the blob part needs 71 of them


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b": no leading, trailing or doubled slash

    def __post_init__(self) -> None:
        check_bucket_name(self.bucket)
        check_prefix(self.prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def is_s3_url(text: str) -> bool:
    return text.lower().startswith("s3://")


def parse_s3_url(url: str) -> S3Location:
    """`s3://bucket` or `s3://bucket/prefix` -> its bucket and prefix; ValueError saying what
    is wrong with anything else."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"blob URL {url!r}: expected s3://bucket/prefix (scheme s3)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(
            f"blob URL {url!r}: expected no query or fragment, only s3://bucket/prefix"
        )
    if "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError(
            f"blob URL {url!r}: expected only a bucket name after s3:// (the endpoint and "
            "credentials come from AWS_ENDPOINT_URL and the AWS credential variables)"
        )
    prefix = parts.path[1:] if parts.path.startswith("/") else parts.path
    try:
        return S3Location(parts.netloc, prefix)
    except ValueError as error:
        raise ValueError(f"blob URL {url!r}: {error}") from None


def check_bucket_name(bucket: str) -> None:
    """S3's rules for a bucket name: 3-63 lowercase letters, digits, dots and hyphens,
    starting and ending with a letter or digit, no `..`, not an IP address."""
    if not _BUCKET.match(bucket) or ".." in bucket or _IPV4.match(bucket):
        raise ValueError(
            f"{bucket!r} is not a valid bucket name: expected 3-63 lowercase letters, digits, "
            "dots and hyphens, starting and ending with a letter or digit, without '..', "
            "not an IP address"
        )


def check_prefix(prefix: str) -> None:
    if not prefix:
        return
    if prefix.startswith("/"):
        raise ValueError(f"prefix {prefix!r} starts with a slash: expected s3://bucket/prefix")
    if len(prefix) > MAX_PREFIX_CHARS:
        raise ValueError(
            f"prefix is {len(prefix)} characters long: expected at most {MAX_PREFIX_CHARS}"
        )
    for segment in prefix.split("/"):
        if not segment:
            raise ValueError(
                f"prefix {prefix!r} has an empty segment (a doubled or trailing slash): "
                "expected segments like a/b"
            )
        if segment in (".", ".."):
            raise ValueError(f"prefix {prefix!r} has a {segment!r} segment: expected plain names")
        if not _SEGMENT.match(segment):
            raise ValueError(
                f"prefix segment {segment!r} has characters other than letters, digits, "
                "'.', '_' and '-'"
            )
