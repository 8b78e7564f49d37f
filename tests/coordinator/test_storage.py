"""Blob store guarantees, start-up checks and restarts."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
from fastapi.testclient import TestClient

from coordinator.experts.files import stored_files
from coordinator.storage import LocalBlobStore
from coordinator.storage.blobs import TEMP_PREFIX
from tests.coordinator.helpers import upload


def test_blob_is_named_by_its_sha256_under_a_fanout_folder(tmp_path):
    source = tmp_path / "file"
    source.write_bytes(b"hello")
    digest = hashlib.sha256(b"hello").hexdigest()

    stored = LocalBlobStore(tmp_path / "blobs").put_file(source)

    assert (stored.sha256, stored.size) == (digest, 5)
    assert (tmp_path / "blobs" / digest[:2] / digest[2:]).read_bytes() == b"hello"


def test_same_content_is_stored_once(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"same")
        store.put_file(tmp_path / name)
    assert list(store.iter_blobs()) == [hashlib.sha256(b"same").hexdigest()]


def test_content_that_does_not_match_the_expected_hash_is_not_stored(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    (tmp_path / "f").write_bytes(b"actual")
    with pytest.raises(ValueError, match="changed while being stored"):
        store.put_file(tmp_path / "f", expected_sha256="0" * 64)
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


def test_restart_keeps_catalog_and_blobs(make_app, settings, client, alice, package):
    directory = package("alice/kept")
    assert upload(client, alice, directory).status_code == 201

    with TestClient(make_app(settings)) as restarted:
        version = restarted.get("/api/v1/experts/alice/kept/1")
        download = restarted.get("/api/v1/experts/alice/kept/1/files/adapter_model.safetensors")
        me = restarted.get("/api/v1/auth/me", headers=alice)

    assert version.status_code == 200
    assert download.content == (directory / "adapter_model.safetensors").read_bytes()
    assert me.json()["name"] == "alice"


def test_startup_removes_stale_temp_files(make_app, settings, app):
    blob_temp = settings.blob_dir / "ab" / f"{TEMP_PREFIX}123-dead"
    blob_temp.parent.mkdir(parents=True)
    blob_temp.write_bytes(b"half a blob")
    upload_temp = settings.upload_tmp_dir / ".tmp-upload-crashed"
    upload_temp.mkdir()
    (upload_temp / "expert.json").write_text("{")
    old = time.time() - settings.stale_temp_seconds - 60
    for path in (blob_temp, upload_temp):
        os.utime(path, (old, old))

    report = make_app(settings).state.startup_report

    assert sorted(report.removed_temp_files) == sorted([str(blob_temp), str(upload_temp)])
    assert not blob_temp.exists()
    assert not upload_temp.exists()


def test_startup_keeps_recent_temp_files_of_running_uploads(make_app, settings, app):
    recent = settings.upload_tmp_dir / ".tmp-upload-in-progress"
    recent.mkdir()
    report = make_app(settings).state.startup_report
    assert report.removed_temp_files == []
    assert recent.exists()


def test_startup_reports_a_row_whose_blob_is_missing(make_app, settings, client, alice, package):
    body = upload(client, alice, package("alice/lost")).json()
    manifest = next(f for f in body["files"] if f["filename"] == "expert.json")
    LocalBlobStore(settings.blob_dir).path(manifest["sha256"]).unlink()

    report = make_app(settings).state.startup_report

    assert not report.healthy
    assert [(m.ref, m.filename, m.sha256, m.pieces) for m in report.missing_blobs] == [
        ("alice/lost@1", "expert.json", manifest["sha256"], ())
    ]


def test_startup_names_the_missing_piece_of_a_file_stored_in_pieces(
    make_app, settings, client, alice, package
):
    body = upload(client, alice, package("alice/lost")).json()
    router = next(f for f in body["files"] if f["filename"] == "router.safetensors")
    app = make_app(settings)
    with app.state.sessionmaker() as session:
        pieces = stored_files(session, [(router["sha256"], router["size"])])[router["sha256"]]
    assert len(pieces.pieces) > 2  # the header and a gate per module
    lost = pieces.pieces[1].sha256
    LocalBlobStore(settings.blob_dir).path(lost).unlink()

    report = make_app(settings).state.startup_report

    assert [(m.ref, m.filename, m.pieces) for m in report.missing_blobs] == [
        ("alice/lost@1", "router.safetensors", (lost,))
    ]
    assert lost in report.missing_blobs[0].describe()
