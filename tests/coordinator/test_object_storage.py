"""Blobs in S3-compatible object storage (a moto S3 server on loopback): the BlobStore
contract on both stores, the coordinator over S3, and `copy-blobs` between them."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from coordinator.auth.models import Role
from coordinator.base_models.service import register_base_model
from coordinator.cli import app as cli
from coordinator.core.config import Settings
from coordinator.experts.files import needed_blobs, open_file, stored_files
from coordinator.releases.service import export_release, get_release
from coordinator.storage import BlobNotFound, BlobStore, BlobStoreError, LocalBlobStore
from coordinator.storage.blobs import TEMP_PREFIX
from coordinator.storage.s3 import MIN_PART_BYTES, S3BlobStore
from coordinator.storage.urls import S3Location, parse_s3_url
from protocol import ReleaseManifest
from tests.coordinator.helpers import bearer_headers, stored_bytes, upload
from tests.coordinator.release_helpers import create_release, publish
from tests.coordinator.s3_server import (  # noqa: F401  (fixtures)
    bucket_fixture,
    moto_server_fixture,
    objects,
    s3_env_fixture,
    s3_fixture,
    unfinished_uploads,
)

PREFIX = "team/coordinator"
runner = CliRunner()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ the BlobStore contract


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each contract test runs on the local folder and on S3 (parts of the S3 minimum,
    5 MiB, so that a few MB already take the multipart path)."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    name, client = request.getfixturevalue("bucket"), request.getfixturevalue("s3")
    return S3BlobStore(name, PREFIX, client, part_bytes=MIN_PART_BYTES)


def _everything_stored(store: BlobStore) -> list[str]:
    """All the store holds, finished or not: files (temp files too) or objects and
    unfinished multipart uploads."""
    if isinstance(store, LocalBlobStore):
        return sorted(str(p) for p in store.root.rglob("*") if p.is_file())
    assert isinstance(store, S3BlobStore)
    listed = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return sorted([o["Key"] for o in listed] + [f"upload {u['Key']}" for u in uploads])


def _interrupted_write(store: BlobStore, sha256: str) -> str:
    """What a process killed mid-write leaves; returns how the clean-up names it."""
    if isinstance(store, LocalBlobStore):
        temp = store.path(sha256).parent / f"{TEMP_PREFIX}4242-cut"
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(b"half a blob")
        old = temp.stat().st_mtime - 3600
        os.utime(temp, (old, old))
        return str(temp)
    assert isinstance(store, S3BlobStore)
    key = store.key(sha256)
    started = store.client.create_multipart_upload(Bucket=store.bucket, Key=key)
    store.client.upload_part(
        Bucket=store.bucket,
        Key=key,
        UploadId=started["UploadId"],
        PartNumber=1,
        Body=b"half a blob",
    )
    return f"s3://{store.bucket}/{key} (unfinished multipart upload {started['UploadId']}"


def test_put_then_open_returns_the_bytes_exactly(store, tmp_path):
    data = bytes(range(256)) * 40 + b"\x00\r\n"
    stored = store.put_file(_write(tmp_path / "file", data))

    assert (stored.sha256, stored.size) == (_sha256(data), len(data))
    assert store.exists(stored.sha256)
    with store.open(stored.sha256) as reader:
        assert reader.read(8) == data[:8]  # read(n) gives n bytes, as safetensors headers need
        assert reader.read() == data[8:]


def test_the_same_bytes_are_stored_once_under_their_digest(store, tmp_path):
    first = store.put_file(_write(tmp_path / "a", b"same bytes"))
    before = _everything_stored(store)
    second = store.put_file(_write(tmp_path / "b", b"same bytes"), expected_sha256=first.sha256)

    assert first == second
    assert list(store.iter_blobs()) == [_sha256(b"same bytes")]
    assert _everything_stored(store) == before


@pytest.mark.parametrize("size", [100, 2 * MIN_PART_BYTES + 1], ids=["one-put", "multipart"])
def test_bytes_that_do_not_hash_to_the_expected_digest_are_refused_and_nothing_is_stored(
    store, tmp_path, size
):
    source = _write(tmp_path / "f", os.urandom(size))
    claimed = _sha256(b"something else")

    with pytest.raises(ValueError, match="changed while being stored"):
        store.put_file(source, expected_sha256=claimed)

    assert not store.exists(claimed)
    assert _everything_stored(store) == []  # no object, no unfinished upload, no temp file


def test_a_missing_blob_is_blob_not_found(store):
    missing = _sha256(b"never stored")
    assert not store.exists(missing)
    with pytest.raises(BlobNotFound, match=missing):
        store.open(missing)


def test_a_blob_larger_than_a_part_round_trips(store, tmp_path):
    data = os.urandom(2 * MIN_PART_BYTES + 12345)  # three parts
    stored = store.put_file(_write(tmp_path / "big", data), expected_sha256=_sha256(data))

    with store.open(stored.sha256) as reader, (tmp_path / "back").open("wb") as out:
        shutil.copyfileobj(reader, out)
    assert (tmp_path / "back").read_bytes() == data
    if isinstance(store, S3BlobStore):  # it went up as a multipart upload of three parts
        head = store.client.head_object(Bucket=store.bucket, Key=store.key(stored.sha256))
        assert head["ETag"].strip('"').endswith("-3")


def test_iter_blobs_lists_every_digest(store, tmp_path):
    digests = {
        store.put_file(_write(tmp_path / str(i), f"blob {i}".encode())).sha256 for i in range(5)
    }
    assert sorted(store.iter_blobs()) == sorted(digests)


def test_what_an_interrupted_write_left_is_removed(store, tmp_path):
    kept = store.put_file(_write(tmp_path / "kept", b"a finished blob"))
    left = _interrupted_write(store, _sha256(b"an upload cut off"))

    removed = store.remove_stale_temp_files(0)

    assert len(removed) == 1 and removed[0].startswith(left)
    assert _everything_stored(store) == _everything_stored_after_one(store, kept.sha256)
    assert store.remove_stale_temp_files(0) == []


def _everything_stored_after_one(store: BlobStore, sha256: str) -> list[str]:
    if isinstance(store, LocalBlobStore):
        return [str(store.path(sha256))]
    assert isinstance(store, S3BlobStore)
    return [store.key(sha256)]


# ------------------------------------------------------------------ S3 specifics


def test_s3_keys_are_the_local_fan_out_under_the_prefix(bucket, s3, tmp_path):
    store = S3BlobStore(bucket, PREFIX)
    digest = store.put_file(_write(tmp_path / "f", b"hello")).sha256

    assert objects(s3, bucket) == {f"{PREFIX}/blobs/{digest[:2]}/{digest[2:]}": b"hello"}
    assert S3BlobStore(bucket, "").key(digest) == f"blobs/{digest[:2]}/{digest[2:]}"


def test_s3_listing_and_clean_up_stay_under_the_prefix(bucket, s3, tmp_path):
    store = S3BlobStore(bucket, PREFIX)
    ours = store.put_file(_write(tmp_path / "f", b"ours")).sha256
    neighbour = S3BlobStore(bucket, "other")
    theirs = neighbour.put_file(_write(tmp_path / "g", b"theirs")).sha256
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/blobs/readme.txt", Body=b"not a blob")
    _interrupted_write(neighbour, theirs)

    assert list(store.iter_blobs()) == [ours]
    assert store.remove_stale_temp_files(0) == []
    assert unfinished_uploads(s3, bucket) == [neighbour.key(theirs)]


def test_a_failure_mid_multipart_upload_aborts_it(bucket, s3, tmp_path):
    class FailsOnSecondPart:
        """The S3 client, except that the second part never arrives."""

        def __init__(self, client: Any) -> None:
            self.client, self.parts = client, 0

        def upload_part(self, **arguments: Any) -> Any:
            self.parts += 1
            if self.parts == 2:
                raise ConnectionResetError("network gone")
            return self.client.upload_part(**arguments)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.client, name)

    store = S3BlobStore(bucket, PREFIX, FailsOnSecondPart(s3), part_bytes=MIN_PART_BYTES)
    data = os.urandom(2 * MIN_PART_BYTES)

    with pytest.raises(ConnectionResetError):
        store.put_file(_write(tmp_path / "big", data), expected_sha256=_sha256(data))

    assert objects(s3, bucket) == {}
    assert unfinished_uploads(s3, bucket) == []


def test_a_missing_s3_blob_names_bucket_and_key(bucket):
    store = S3BlobStore(bucket, PREFIX)
    missing = _sha256(b"absent")
    with pytest.raises(BlobNotFound) as raised:
        store.open(missing)
    assert str(raised.value) == (
        f"blob {missing} is missing from bucket {bucket} (key {store.key(missing)})"
    )


def test_a_bucket_that_does_not_exist_is_a_clear_error(s3_env, moto_server):
    store = S3BlobStore("no-such-bucket-here", PREFIX)
    with pytest.raises(BlobStoreError) as raised:
        store.check()
    assert str(raised.value) == (
        f"bucket no-such-bucket-here does not exist at {moto_server}: create it, or set "
        "PHATGOOSE_BLOB_URL (and AWS_ENDPOINT_URL) to an existing one"
    )


def test_an_unreachable_endpoint_is_a_clear_error(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = S3BlobStore("some-bucket", PREFIX)
    with pytest.raises(BlobStoreError) as raised:
        store.check()
    message = str(raised.value)
    assert message.startswith("cannot open bucket some-bucket at http://127.0.0.1:9")
    assert message.endswith(
        "expected an S3-compatible endpoint there (set AWS_ENDPOINT_URL for one other than AWS)"
    )


# ------------------------------------------------------------------ the blob URL setting


@pytest.mark.parametrize(
    ("url", "bucket_name", "prefix"),
    [
        ("s3://my-bucket", "my-bucket", ""),
        ("s3://my-bucket/", "my-bucket", ""),
        ("s3://my.bucket-1/team/coord_v2.x", "my.bucket-1", "team/coord_v2.x"),
    ],
)
def test_blob_urls_name_a_bucket_and_a_prefix(url, bucket_name, prefix):
    assert parse_s3_url(url) == S3Location(bucket_name, prefix)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("https://my-bucket/x", "expected s3://bucket/prefix (scheme s3)"),
        ("s3://ab/x", "'ab' is not a valid bucket name"),
        ("s3://My_Bucket/x", "'My_Bucket' is not a valid bucket name"),
        ("s3://my..bucket/x", "'my..bucket' is not a valid bucket name"),
        ("s3://192.168.1.1/x", "'192.168.1.1' is not a valid bucket name"),
        ("s3://my-bucket//x", "prefix '/x' starts with a slash"),
        ("s3://my-bucket/a//b", "prefix 'a//b' has an empty segment"),
        ("s3://my-bucket/a/", "prefix 'a/' has an empty segment"),
        ("s3://my-bucket/a/../b", "prefix 'a/../b' has a '..' segment"),
        ("s3://my-bucket/a b", "prefix segment 'a b' has characters other than"),
        ("s3://key:secret@my-bucket/x", "expected only a bucket name after s3://"),
        ("s3://my-bucket/x?region=eu", "expected no query or fragment"),
    ],
)
def test_a_malformed_blob_url_is_refused_saying_why(url, complaint):
    with pytest.raises(ValueError, match="blob URL") as raised:
        parse_s3_url(url)
    assert complaint in str(raised.value)
    with pytest.raises(ValidationError, match="blob URL"):
        Settings(blob_url=url)


def test_an_empty_blob_url_means_the_local_folder(monkeypatch):
    monkeypatch.setenv("PHATGOOSE_BLOB_URL", "")
    assert Settings().blob_url is None


# ------------------------------------------------------------------ the coordinator over S3


@pytest.fixture
def s3_settings(settings: Settings, bucket: str) -> Settings:
    return settings.model_copy(update={"blob_url": f"s3://{bucket}/{PREFIX}"})


def _coordinator(make_app, settings, tiny_base):
    app = make_app(settings)
    with app.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    return app


def test_the_coordinator_keeps_uploads_in_s3_and_serves_them_back(
    make_app, s3_settings, tiny_base, package, base_spec, bucket, s3
):
    app = _coordinator(make_app, s3_settings, tiny_base)
    alice = bearer_headers(app, "alice", Role.CONTRIBUTOR)
    directory = package("alice/remote", seed=3)
    with TestClient(app) as client:
        reply = upload(client, alice, directory)
        assert reply.status_code == 201, reply.text
        for name, data in stored_bytes(directory, base_spec).items():
            response = client.get(f"/api/v1/experts/alice/remote/1/files/{name}")
            assert response.status_code == 200
            assert response.content == data

    # Exactly the blobs the catalog needs: JSON files whole, safetensors files in pieces.
    with app.state.sessionmaker() as session:
        needed = needed_blobs(session)
    files = {f["sha256"] for f in reply.json()["files"]}
    assert len(needed) > len(files)
    assert {f["sha256"] for f in reply.json()["files"] if f["filename"].endswith(".json")} <= needed
    assert set(objects(s3, bucket)) == {f"{PREFIX}/blobs/{d[:2]}/{d[2:]}" for d in needed}
    assert not s3_settings.blob_dir.exists()  # nothing went to the local folder
    report = make_app(s3_settings).state.startup_report
    assert report.healthy
    assert report.blob_store == f"s3://{bucket}/{PREFIX}"


def test_releases_read_their_experts_from_s3(make_app, s3_settings, tiny_base, tmp_path):
    app = _coordinator(make_app, s3_settings, tiny_base)
    alice = bearer_headers(app, "alice", Role.CONTRIBUTOR)
    carol = bearer_headers(app, "carol", Role.MAINTAINER)
    with TestClient(app) as client:
        publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
        publish(client, alice, tiny_base, tmp_path / "b", "alice/b", seed=1)
        # merged reads each adapter's safetensors header through the store
        create_release(client, carol, method="merged", experts=["alice/a", "alice/b"])
    with app.state.sessionmaker() as session:
        release = get_release(session, 1)
        out = export_release(session, app.state.blobs, release, tmp_path / "out")
    experts = ReleaseManifest.model_validate(release.manifest).experts
    assert len(experts) == 2
    for entry in experts:
        for file in entry.files:
            assert _sha256((out / entry.path / file.filename).read_bytes()) == file.sha256


def test_startup_over_s3_aborts_unfinished_uploads_and_names_missing_objects(
    make_app, s3_settings, tiny_base, package, bucket, s3
):
    app = _coordinator(make_app, s3_settings, tiny_base)
    alice = bearer_headers(app, "alice", Role.CONTRIBUTOR)
    with TestClient(app) as client:
        files = upload(client, alice, package("alice/lost")).json()["files"]
    router = next(f for f in files if f["filename"] == "router.safetensors")
    store = app.state.blobs
    lost = _pieces(app, router)[1]
    s3.delete_object(Bucket=bucket, Key=store.key(lost))
    left = _interrupted_write(store, _sha256(b"a crashed upload"))

    report = make_app(s3_settings.model_copy(update={"stale_temp_seconds": 0})).state.startup_report

    assert len(report.removed_temp_files) == 1 and report.removed_temp_files[0].startswith(left)
    assert unfinished_uploads(s3, bucket) == []
    assert not report.healthy
    assert [(m.ref, m.filename, m.sha256, m.pieces) for m in report.missing_blobs] == [
        ("alice/lost@1", "router.safetensors", router["sha256"], (lost,))
    ]


def _pieces(app: Any, file: dict[str, Any]) -> list[str]:
    """The digests of the blobs a file, as the upload reply lists it, is stored in."""
    with app.state.sessionmaker() as session:
        stored = stored_files(session, [(file["sha256"], file["size"])])[file["sha256"]]
    return [piece.sha256 for piece in stored.pieces]


def test_a_download_whose_object_is_gone_is_500_naming_the_file(
    make_app, s3_settings, tiny_base, package, bucket, s3
):
    app = _coordinator(make_app, s3_settings, tiny_base)
    alice = bearer_headers(app, "alice", Role.CONTRIBUTOR)
    with TestClient(app) as client:
        files = upload(client, alice, package("alice/gone")).json()["files"]
        router = next(f for f in files if f["filename"] == "router.safetensors")
        # A file stored in pieces: its first piece, the header, is read before any byte goes
        s3.delete_object(Bucket=bucket, Key=app.state.blobs.key(_pieces(app, router)[0]))
        response = client.get("/api/v1/experts/alice/gone/1/files/router.safetensors")
    assert response.status_code == 500
    assert response.json()["detail"]["message"] == (
        "the stored bytes of alice/gone@1 router.safetensors are missing on the coordinator"
    )


def test_a_coordinator_whose_bucket_does_not_exist_does_not_start(
    make_app, settings, s3_env, moto_server
):
    with pytest.raises(BlobStoreError) as raised:
        make_app(settings.model_copy(update={"blob_url": "s3://no-such-bucket-here/x"}))
    assert str(raised.value).startswith(
        f"bucket no-such-bucket-here does not exist at {moto_server}"
    )


def test_the_check_command_reads_the_configured_bucket(settings, bucket, monkeypatch):
    arguments = ["check", "--data-dir", str(settings.data_dir)]
    arguments += ["--database-url", settings.resolved_database_url]
    monkeypatch.setenv("PHATGOOSE_BLOB_URL", f"s3://{bucket}/{PREFIX}")
    result = runner.invoke(cli, arguments, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"checked the blob store s3://{bucket}/{PREFIX}" in result.output

    monkeypatch.setenv("PHATGOOSE_BLOB_URL", "s3://no-such-bucket-here")
    result = runner.invoke(cli, arguments, env={"COLUMNS": "400"})
    assert result.exit_code == 1
    assert "bucket no-such-bucket-here does not exist at" in result.output


# ------------------------------------------------------------------ copy-blobs


@pytest.fixture
def local_catalog(app, client, alice, package, base_spec) -> dict[str, dict[str, bytes]]:
    """Two versions uploaded into local storage; ref -> file name -> bytes served."""
    served = {}
    for ref, seed in (("alice/one", 1), ("alice/two", 2)):
        directory = package(ref, seed=seed)
        assert upload(client, alice, directory).status_code == 201
        served[ref] = stored_bytes(directory, base_spec)
    return served


def _catalog_files(catalog: dict[str, dict[str, bytes]]) -> int:
    return len({_sha256(data) for files in catalog.values() for data in files.values()})


def _copy_blobs(settings: Settings, to: str) -> Any:
    arguments = ["--data-dir", str(settings.data_dir)]
    arguments += ["--database-url", settings.resolved_database_url]
    # Wide enough that typer's error box does not wrap the messages the tests look for.
    return runner.invoke(cli, ["copy-blobs", "--to", to, *arguments], env={"COLUMNS": "400"})


def test_copy_blobs_moves_a_local_catalog_into_s3_and_the_coordinator_serves_it_from_there(
    settings, make_app, local_catalog, bucket, s3, monkeypatch
):
    monkeypatch.delenv("PHATGOOSE_BLOB_URL", raising=False)
    blobs = len(list(LocalBlobStore(settings.blob_dir).iter_blobs()))
    files = _catalog_files(local_catalog)
    url = f"s3://{bucket}/{PREFIX}"

    result = _copy_blobs(settings, url)

    assert result.exit_code == 0, result.output
    assert f"copied {blobs}, already there 0, verified {files} of {files} catalog file(s)" in (
        result.output
    )
    assert f"PHATGOOSE_BLOB_URL={url}" in result.output
    shutil.rmtree(settings.blob_dir)  # the coordinator below can only read from S3
    with TestClient(make_app(settings.model_copy(update={"blob_url": url}))) as client:
        for ref, files in local_catalog.items():
            for name, data in files.items():
                response = client.get(f"/api/v1/experts/{ref}/1/files/{name}")
                assert response.status_code == 200
                assert response.content == data


def test_copy_blobs_again_copies_nothing(settings, local_catalog, bucket, monkeypatch):
    monkeypatch.delenv("PHATGOOSE_BLOB_URL", raising=False)
    url = f"s3://{bucket}/{PREFIX}"
    assert _copy_blobs(settings, url).exit_code == 0
    blobs = len(list(LocalBlobStore(settings.blob_dir).iter_blobs()))
    files = _catalog_files(local_catalog)

    result = _copy_blobs(settings, url)

    assert result.exit_code == 0, result.output
    assert f"copied 0, already there {blobs}, verified {files} of {files}" in result.output


def test_copy_blobs_reads_the_destination_back_and_names_a_corrupt_object(
    app, settings, local_catalog, bucket, s3, monkeypatch
):
    monkeypatch.delenv("PHATGOOSE_BLOB_URL", raising=False)
    url = f"s3://{bucket}/{PREFIX}"
    assert _copy_blobs(settings, url).exit_code == 0
    router = local_catalog["alice/two"]["router.safetensors"]
    with app.state.sessionmaker() as session:
        stored = stored_files(session, [(_sha256(router), len(router))])[_sha256(router)]
    store = S3BlobStore(bucket, PREFIX)
    header = stored.pieces[0]
    # The header piece, replaced: the file as read back is the router with another header.
    s3.put_object(Bucket=bucket, Key=store.key(header.sha256), Body=b"not the header")
    read_back = b"not the header" + router[header.size :]

    result = _copy_blobs(settings, url)

    assert result.exit_code == 1
    assert (
        f"CORRUPT {_sha256(router)} in s3://{bucket}/{PREFIX}: reads back as sha256 "
        f"{_sha256(read_back)}: alice/two@1 router.safetensors"
    ) in result.output


def test_copy_blobs_names_a_catalog_file_whose_blob_the_source_lacks(
    settings, local_catalog, bucket, monkeypatch
):
    monkeypatch.delenv("PHATGOOSE_BLOB_URL", raising=False)
    digest = _sha256(local_catalog["alice/one"]["expert.json"])
    LocalBlobStore(settings.blob_dir).path(digest).unlink()

    result = _copy_blobs(settings, f"s3://{bucket}/{PREFIX}")

    assert result.exit_code == 1
    assert f"MISSING {digest} in s3://{bucket}/{PREFIX}: alice/one@1 expert.json" in result.output


def test_copy_blobs_from_s3_into_a_local_folder(
    app, settings, local_catalog, bucket, tmp_path, monkeypatch
):
    monkeypatch.delenv("PHATGOOSE_BLOB_URL", raising=False)
    url = f"s3://{bucket}/{PREFIX}"
    assert _copy_blobs(settings, url).exit_code == 0
    monkeypatch.setenv("PHATGOOSE_BLOB_URL", url)  # now S3 is the configured store
    folder = tmp_path / "blobs-back"

    result = _copy_blobs(settings, str(folder))

    assert result.exit_code == 0, result.output
    back = LocalBlobStore(folder)
    with app.state.sessionmaker() as session:
        for files in local_catalog.values():
            for data in files.values():
                stored = stored_files(session, [(_sha256(data), len(data))])[_sha256(data)]
                with open_file(back, stored) as reader:
                    assert reader.read() == data
    assert list(settings.upload_tmp_dir.iterdir()) == []  # staging files removed


@pytest.mark.parametrize(
    ("to", "complaint"),
    [("ftp://host/blobs", "expected s3://bucket/prefix or a local folder"), ("SAME", "itself")],
)
def test_copy_blobs_refuses_a_destination_it_cannot_use(
    settings, local_catalog, monkeypatch, to, complaint
):
    monkeypatch.delenv("PHATGOOSE_BLOB_URL", raising=False)
    result = _copy_blobs(settings, str(settings.blob_dir) if to == "SAME" else to)
    assert result.exit_code == 2
    assert complaint in result.output
