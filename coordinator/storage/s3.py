"""Blobs in S3-compatible object storage, under the same contract as the local folder.

Keys are `<prefix>/blobs/ab/cdef...` (the local fan-out under a prefix). S3 makes an
object visible only once its PUT, or the completion of its multipart upload, has
succeeded, so no reader ever sees part of a blob under its key. The bytes are hashed as
they are read from the local file and sent; a file that does not hash to the expected
digest is never made visible: a single PUT is not sent, a multipart upload is aborted
instead of completed. An upload cut off by a crash leaves an unfinished multipart upload
(invisible, but stored and billed), which `remove_stale_temp_files` aborts at start-up.

Why an explicit multipart upload rather than boto3's transfer manager (`upload_fileobj`):
the transfer manager completes the upload itself, so a digest known only at the end could
be checked only after the object is visible, and deleting it then could delete the same
blob a concurrent upload had just stored correctly.

Checksums: botocore's default request checksum (CRC32, `when_supported`) already lets the
server verify every PUT and part body in transit; a SHA-256 `ChecksumSHA256` is not sent,
since moto 5.2 (the test server) stores it without verifying it (a wrong one is accepted),
so its effect could not be tested, and some S3-compatible servers refuse it.

The endpoint, region and credentials come from the usual AWS environment
(`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, `AWS_PROFILE`, the config files), as for every other AWS tool.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from coordinator.storage.blobs import BlobNotFound, BlobStoreError, StoredBlob, file_sha256
from coordinator.storage.urls import S3Location, parse_s3_url

log = logging.getLogger(__name__)

MIN_PART_BYTES = 5 * 2**20  # S3's smallest part but the last
PART_BYTES = 8 * 2**20  # boto3's transfer manager uses the same
MAX_PARTS = 10_000  # S3's limit per multipart upload
_READ_BUFFER = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BLOB_KEY = re.compile(r"^([0-9a-f]{2})/([0-9a-f]{62})$")
_MISSING = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {
    "403",
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
}
# The permissions the coordinator needs on its bucket, named in access errors.
_PERMISSIONS = (
    "s3:ListBucket, s3:GetObject, s3:PutObject, s3:ListBucketMultipartUploads and "
    "s3:AbortMultipartUpload"
)


def new_client() -> Any:
    """An S3 client configured from the AWS environment, read now (a new session each time,
    so that variables set after import count, and no client is shared across forks)."""
    return boto3.session.Session().client("s3")


class S3BlobStore:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any | None = None,
        *,
        part_bytes: int = PART_BYTES,
    ) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes {part_bytes}: S3 needs parts of at least 5 MiB")
        self.place = S3Location(bucket, prefix)  # validates both
        self.bucket, self.prefix = bucket, prefix
        self.client = client if client is not None else new_client()
        self.part_bytes = part_bytes
        self._blob_prefix = f"{prefix}/blobs/" if prefix else "blobs/"

    @classmethod
    def from_url(cls, url: str, client: Any | None = None) -> S3BlobStore:
        place = parse_s3_url(url)
        return cls(place.bucket, place.prefix, client)

    @property
    def location(self) -> str:
        return self.place.url

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def key(self, sha256: str) -> str:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return f"{self._blob_prefix}{sha256[:2]}/{sha256[2:]}"

    def check(self) -> None:
        """Fail now, with the reason, when the bucket does not exist or cannot be reached or
        read with these credentials (start-up calls this, rather than the first upload)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, "open") from None

    def exists(self, sha256: str) -> bool:
        return self._size(self.key(sha256)) is not None

    def local_path(self, sha256: str) -> Path | None:
        return None  # read through `open`

    def open(self, sha256: str) -> BinaryIO:
        """The blob's bytes, streamed from the store as they are read."""
        key = self.key(sha256)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _code(error) in _MISSING:
                raise BlobNotFound(
                    f"blob {sha256} is missing from bucket {self.bucket} (key {key})"
                ) from None
            raise self._error(error, "read", key) from None
        except BotoCoreError as error:
            raise self._error(error, "read", key) from None
        return io.BufferedReader(_ObjectBody(response["Body"]), _READ_BUFFER)

    def put_file(self, source: Path, expected_sha256: str | None = None) -> StoredBlob:
        """Store `source` under its digest unless that blob is there already; raise
        ValueError, leaving nothing under the key, if its bytes do not hash to
        `expected_sha256`. With no digest given, the local file is hashed first, so that
        the upload goes straight to its final key."""
        sha256 = expected_sha256 if expected_sha256 is not None else file_sha256(source)
        key = self.key(sha256)
        present = self._size(key)
        # Offered again: refreshed so that it is not garbage (`stored_at`); one collected
        # meanwhile is stored again.
        if present is not None and self._touch(key):
            return StoredBlob(sha256, present)
        size = source.stat().st_size
        # Parts grow past `part_bytes` only for files over MAX_PARTS of them (80 GB).
        part = max(self.part_bytes, -(-size // MAX_PARTS))
        with source.open("rb") as reader:
            first = reader.read(part)
            if len(first) < part:  # the whole file: one PUT, in memory (under one part)
                _check_digest(source, hashlib.sha256(first).hexdigest(), sha256)
                self._call("store", key, self.client.put_object, Body=first)
                return StoredBlob(sha256, len(first))
            return self._put_multipart(source, reader, first, part, key, sha256)

    def remove_stale_temp_files(self, older_than_seconds: float) -> list[str]:
        """Abort unfinished multipart uploads under the prefix started at least this long
        ago: what a crash mid-upload leaves behind."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_seconds)
        removed = []
        for upload in self.multipart_uploads():
            if upload["Initiated"] > cutoff:
                continue  # maybe another process's upload, still running
            key, upload_id = upload["Key"], upload["UploadId"]
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as error:
                if _code(error) in ("NoSuchUpload", "404"):
                    continue  # completed or aborted meanwhile
                raise self._error(error, "abort the multipart upload of", key) from None
            except BotoCoreError as error:
                raise self._error(error, "abort the multipart upload of", key) from None
            removed.append(
                f"s3://{self.bucket}/{key} (unfinished multipart upload {upload_id}, "
                f"started {upload['Initiated']:%Y-%m-%d %H:%M:%S %Z})"
            )
        return removed

    def iter_blobs(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._blob_prefix
        )
        try:
            for page in pages:
                for entry in page.get("Contents", []):
                    match = _BLOB_KEY.match(entry["Key"][len(self._blob_prefix) :])
                    if match:
                        yield match.group(1) + match.group(2)
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, "list", self._blob_prefix) from None

    def stored_at(self, sha256: str) -> float | None:
        head = self._head(self.key(sha256))
        return None if head is None else float(head["LastModified"].timestamp())

    def remove(self, sha256: str) -> None:
        key = self.key(sha256)
        self._call("delete", key, self.client.delete_object)

    # ---------------------------------------------------------------- helpers

    def _touch(self, key: str) -> bool:
        """Refresh the object's LastModified: copied onto itself, metadata replaced (S3 has
        no cheaper way; the bytes are copied inside the store). False if it is gone."""
        try:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                MetadataDirective="REPLACE",
            )
        except ClientError as error:
            if _code(error) in _MISSING:
                return False
            raise self._error(error, "refresh", key) from None
        except BotoCoreError as error:
            raise self._error(error, "refresh", key) from None
        return True

    def _put_multipart(
        self, source: Path, reader: BinaryIO, first: bytes, part: int, key: str, sha256: str
    ) -> StoredBlob:
        """Send the file part by part (one part in memory at a time), then complete the
        upload only if the bytes sent hash to `sha256`; abort it otherwise."""
        upload_id = self._call("start the upload of", key, self.client.create_multipart_upload)[
            "UploadId"
        ]
        try:
            digest, size = hashlib.sha256(), 0
            parts: list[dict[str, Any]] = []
            chunk = first
            while chunk:
                digest.update(chunk)
                size += len(chunk)
                number = len(parts) + 1
                sent = self._call(
                    "upload a part of",
                    key,
                    self.client.upload_part,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                )
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
                chunk = reader.read(part)
            _check_digest(source, digest.hexdigest(), sha256)
            self._call(
                "complete the upload of",
                key,
                self.client.complete_multipart_upload,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            self._abort(key, upload_id)
            raise
        return StoredBlob(sha256, size)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as error:
            # Still invisible; the next start-up's clean-up aborts it.
            log.warning(
                "could not abort the multipart upload of s3://%s/%s: %s", self.bucket, key, error
            )

    def _size(self, key: str) -> int | None:
        """The object's size, or None when there is none under `key`."""
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _code(error) in _MISSING:
                return None
            raise self._error(error, "look up", key) from None
        except BotoCoreError as error:
            raise self._error(error, "look up", key) from None
        return head

    def multipart_uploads(self) -> Iterator[dict[str, Any]]:
        """The unfinished multipart uploads under the prefix (S3's `Uploads` entries:
        `Key`, `UploadId`, `Initiated`, ...)."""
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self._blob_prefix
        )
        try:
            for page in pages:
                yield from page.get("Uploads", [])
        except (ClientError, BotoCoreError) as error:
            raise self._error(
                error, "list the multipart uploads under", self._blob_prefix
            ) from None

    def _call(self, action: str, key: str, operation: Any, **arguments: Any) -> Any:
        try:
            return operation(Bucket=self.bucket, Key=key, **arguments)
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, action, key) from None

    def _error(self, error: Exception, action: str, key: str | None = None) -> BlobStoreError:
        """What went wrong, where (bucket, key, endpoint) and what was expected."""
        target = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        where = f"{target} at {self.endpoint}"
        if isinstance(error, NoCredentialsError):
            return BlobStoreError(
                f"cannot {action} {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if isinstance(error, BotoCoreError):  # endpoint unreachable, timeouts, ...
            return BlobStoreError(
                f"cannot {action} {where}: {error}; expected an S3-compatible endpoint there "
                "(set AWS_ENDPOINT_URL for one other than AWS)"
            )
        assert isinstance(error, ClientError)
        code = _code(error)
        if code in _NO_BUCKET or (key is None and code in _MISSING):
            return BlobStoreError(
                f"bucket {self.bucket} does not exist at {self.endpoint}: create it, or set "
                "PHATGOOSE_BLOB_URL (and AWS_ENDPOINT_URL) to an existing one"
            )
        if code in _DENIED:
            return BlobStoreError(
                f"cannot {action} {where}: access denied ({code}); the credentials from the "
                f"AWS environment need {_PERMISSIONS} on bucket {self.bucket}"
            )
        message = error.response.get("Error", {}).get("Message", "")
        return BlobStoreError(f"cannot {action} {where}: {code} {message}".rstrip())


class _ObjectBody(io.RawIOBase):
    """botocore's StreamingBody as a raw binary file, so that `io.BufferedReader` gives
    `read(n)` that fills `n` bytes, and `with` closes the HTTP response (StreamingBody's
    own `__enter__` hands out the urllib3 response instead of itself)."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return int(self._body.readinto(buffer))

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _check_digest(source: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise ValueError(
            f"{source.name} changed while being stored: sha256 {actual}, expected {expected}"
        )
