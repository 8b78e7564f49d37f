"""Files stored in pieces, delta uploads and the garbage collection (issue 19, section 2).

`client.push.push_package` talks to the app served on loopback; every test runs on SQLite
and on PostgreSQL like the rest of the coordinator's suite.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from sqlalchemy import select
from typer.testing import CliRunner

from client.push import PushRejected, RetryPolicy, push_package
from coordinator.auth.models import Role
from coordinator.cli import app as cli
from coordinator.experts.files import copy_version_files, needed_blobs, stored_files
from coordinator.experts.models import ExpertFile
from coordinator.experts.service import resolve_ref
from coordinator.storage import LocalBlobStore
from phatgoose.expert import Expert
from protocol import ADAPTER_WEIGHTS_FILE, ROUTER_FILE
from protocol.segments import FileLayout, PackageLayout, SegmentRef, cut_file
from tests.coordinator.helpers import (
    bearer_headers,
    live_server,
    package_parts,
    stored_bytes,
    upload,
)

NO_WAIT = RetryPolicy(attempts=1, backoff_seconds=0.0)


@pytest.fixture
def url(app: Any) -> Iterator[str]:
    with live_server(app) as served:
        yield served


def _push(url: str, headers: dict[str, str], directory: Path, **options: Any) -> dict[str, Any]:
    token = headers["Authorization"].removeprefix("Bearer ")
    return push_package(directory, url, token, progress=False, retry=NO_WAIT, **options)


def _rewrite(path: Path, change: Callable[[str], bool], factor: float = 1.5) -> None:
    """Scale the tensors of a safetensors file whose name `change` picks; keep the rest."""
    with safe_open(str(path), "np") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    for key, value in tensors.items():
        if change(key):
            tensors[key] = (value * factor).astype(value.dtype)
    save_file(tensors, str(path), metadata=metadata)


def _variant(
    source: Path, target: Path, *, adapter: Callable[[str], bool] | None = None, gates: bool = False
) -> Path:
    shutil.copytree(source, target)
    if adapter is not None:
        _rewrite(target / ADAPTER_WEIGHTS_FILE, adapter)
    if gates:
        _rewrite(target / ROUTER_FILE, lambda key: key.endswith(".gate"), factor=0.5)
    return target


def _download(client: Any, ref: str, filename: str) -> bytes:
    namespace, rest = ref.split("/", 1)
    name, version = rest.split("@")
    response = client.get(f"/api/v1/experts/{namespace}/{name}/{version}/files/{filename}")
    assert response.status_code == 200, response.text
    return response.content


def test_safetensors_files_are_stored_in_pieces_and_served_whole(
    app, client, alice, package, base_spec
):
    directory = package("alice/pieces")
    body = upload(client, alice, directory).json()

    with app.state.sessionmaker() as session:
        files = {f["filename"]: f for f in body["files"]}
        stored = stored_files(session, [(f["sha256"], f["size"]) for f in files.values()])
    for filename, data in stored_bytes(directory, base_spec).items():
        where = stored[files[filename]["sha256"]]
        assert where.whole == filename.endswith(".json")
        if filename.endswith(".safetensors"):  # the header, then a piece per tensor
            with safe_open(str(directory / filename), "np") as file:
                assert len(where.pieces) == 1 + len(list(file.keys()))
        assert _download(client, "alice/pieces@1", filename) == data


def test_a_versions_files_are_copied_out_byte_for_byte_whatever_their_storage(
    app, alice, client, package, base_spec, tmp_path
):
    directory = package("alice/copied")
    assert upload(client, alice, directory).status_code == 201
    target = tmp_path / "out"
    target.mkdir()
    (target / ROUTER_FILE).write_bytes(b"an older copy")  # replaced, not appended to

    with app.state.sessionmaker() as session:
        version = resolve_ref(session, "alice/copied@1")
        copy_version_files(
            session, LocalBlobStore(app.state.settings.blob_dir), version.files, target
        )

    expected = stored_bytes(directory, base_spec)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == expected
    Expert.load(target)  # the library reads it back


def test_a_second_version_sharing_tensors_stores_only_the_new_ones(
    app, client, alice, package, tmp_path
):
    first = package("alice/shared")
    assert upload(client, alice, first).status_code == 201
    blobs = set(LocalBlobStore(app.state.settings.blob_dir).iter_blobs())
    # Layer 1's lora_B changed, the gates retrained: everything else as it was.
    second = _variant(
        first, tmp_path / "v2", adapter=lambda k: "layers.1." in k and "lora_B" in k, gates=True
    )

    assert upload(client, alice, second).status_code == 201

    added = set(LocalBlobStore(app.state.settings.blob_dir).iter_blobs()) - blobs
    with safe_open(str(second / ROUTER_FILE), "np") as router:
        gates = [k for k in router.keys() if k.endswith(".gate")]  # noqa: SIM118
    with safe_open(str(second / ADAPTER_WEIGHTS_FILE), "np") as adapter:
        changed = [k for k in adapter.keys() if "layers.1." in k and "lora_B" in k]  # noqa: SIM118
    # The new tensors, and at most the new manifest and another header: the headers hold
    # shapes and offsets, unchanged here, and metadata.
    new_tensors = {
        hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest()
        for path, keys in ((second / ROUTER_FILE, gates), (second / ADAPTER_WEIGHTS_FILE, changed))
        for t in _tensors(path, keys)
    }
    assert new_tensors <= added
    assert len(added - new_tensors) <= 2  # expert.json (its name and training summary)
    with app.state.sessionmaker() as session:
        assert needed_blobs(session) == set(
            LocalBlobStore(app.state.settings.blob_dir).iter_blobs()
        )


def _tensors(path: Path, keys: list[str]) -> list[np.ndarray]:
    with safe_open(str(path), "np") as file:
        return [file.get_tensor(k) for k in keys]


def test_a_delta_push_sends_only_what_the_coordinator_lacks(
    app, url, client, alice, package, tmp_path, base_spec
):
    first = package("alice/delta")
    whole = _push(url, alice, first)
    assert whole["transfer"]["delta"] is False  # nothing of it was there: sent whole
    assert whole["transfer"]["sent_bytes"] == whole["transfer"]["package_bytes"]
    second = _variant(first, tmp_path / "v2", gates=True)
    reference = _variant(first, tmp_path / "v2-plain", gates=True)

    pushed = _push(url, alice, second)

    transfer = pushed["transfer"]
    router_gates = sum(t.nbytes for t in _tensors(second / ROUTER_FILE, _gate_keys(second)))
    assert transfer["delta"] is True
    # The gates went, and the small JSON files whose bytes the coordinator does not hold as
    # sent (it stores the adapter config canonically rewritten); the adapter and the headers
    # did not.
    json_bytes = sum((second / name).stat().st_size for name in JSON_FILES)
    assert router_gates <= transfer["sent_bytes"] <= router_gates + json_bytes
    assert transfer["sent_bytes"] < transfer["package_bytes"] / 2
    assert pushed["ref"] == "alice/delta@2"
    # The same package pushed whole elsewhere would have the same digest.
    plain = client.post(
        "/api/v1/experts",
        headers=bearer_headers(app, "carol", Role.MAINTAINER),
        files=package_parts(reference),
    )
    assert plain.status_code == 409
    assert plain.json()["detail"]["existing"]["package_digest"] == pushed["package_digest"]
    for filename, data in stored_bytes(second, base_spec).items():
        assert _download(client, "alice/delta@2", filename) == data


def _gate_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / ROUTER_FILE), "np") as router:
        return [k for k in router.keys() if k.endswith(".gate")]  # noqa: SIM118


def test_a_delta_push_of_an_identical_package_is_409_and_sends_no_tensor(url, alice, package):
    first = package("alice/again")
    _push(url, alice, first)
    with pytest.raises(PushRejected) as rejected:
        _push(url, alice, first)
    assert rejected.value.status_code == 409
    assert rejected.value.detail["existing"]["version"] == 1


def test_a_delta_upload_goes_through_the_same_admission(url, client, alice, package, tmp_path):
    first = package("alice/checked")
    _push(url, alice, first)
    # Gates scaled past the admission's norm cap: refused as a whole upload would be.
    second = tmp_path / "v2"
    shutil.copytree(first, second)
    _rewrite(second / ROUTER_FILE, lambda key: key.endswith(".gate"), factor=1e6)
    with pytest.raises(PushRejected) as rejected:
        _push(url, alice, second)
    whole = upload(client, alice, second)
    assert rejected.value.status_code == whole.status_code == 422
    assert rejected.value.detail == whole.json()["detail"]


# ------------------------------------------------------------------ malformed delta uploads


def _delta_parts(
    directory: Path, layout: PackageLayout, segments: dict[str, bytes], whole: tuple[str, ...] = ()
) -> list[tuple[str, tuple[str, bytes]]]:
    parts = [("files", (name, (directory / name).read_bytes())) for name in whole]
    parts.append(("layout", ("layout.json", layout.model_dump_json().encode())))
    parts += [("segments", (sha256, data)) for sha256, data in segments.items()]
    return parts


def _layout_of(directory: Path, *names: str) -> PackageLayout:
    return PackageLayout(files={name: FileLayout.of(cut_file(directory / name)) for name in names})


def _segment_bytes(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    out, offset = {}, 0
    for segment in cut_file(path).segments:
        out[segment.sha256] = data[offset : offset + segment.size]
        offset += segment.size
    return out


JSON_FILES = ("expert.json", "adapter_config.json")


@pytest.mark.parametrize(
    ("case", "status", "check"),
    [
        ("segment neither sent nor stored", 422, "segments"),
        ("segment bytes do not match its name", 422, "segments"),
        ("segment the layout does not use", 422, "segments"),
        ("file digest wrong", 422, "layout"),
        ("segment sizes do not add up", 422, "layout"),
        ("file sent whole and in the layout", 422, "file_names"),
        ("layout names no package file", 422, "file_names"),
        ("layout is not json", 422, "layout"),
        ("segments without a layout", 400, "layout"),
        ("segment not named by a digest", 422, "segments"),
        ("file larger than its limit", 413, None),
    ],
)
def test_a_malformed_delta_upload_is_refused_saying_what_and_where(
    app, client, alice, package, case, status, check
):
    directory = package("alice/malformed")
    names = (ADAPTER_WEIGHTS_FILE, ROUTER_FILE)
    layout = _layout_of(directory, *names)
    segments = {
        **_segment_bytes(directory / ADAPTER_WEIGHTS_FILE),
        **_segment_bytes(directory / ROUTER_FILE),
    }
    whole = JSON_FILES
    first = next(iter(segments))
    if case == "segment neither sent nor stored":
        del segments[first]
    elif case == "segment bytes do not match its name":
        segments[first] = segments[first][:-1] + b"\x00"
    elif case == "segment the layout does not use":
        segments["0" * 64] = b"stray"
    elif case == "file digest wrong":
        entry = layout.files[ROUTER_FILE]
        layout = PackageLayout(
            files={**layout.files, ROUTER_FILE: entry.model_copy(update={"sha256": "f" * 64})}
        )
    elif case == "segment sizes do not add up":
        entry = layout.files[ROUTER_FILE]
        layout = PackageLayout(
            files={**layout.files, ROUTER_FILE: entry.model_copy(update={"size": entry.size + 1})}
        )
    elif case == "file sent whole and in the layout":
        whole = (*JSON_FILES, ROUTER_FILE)
    elif case == "layout names no package file":
        layout = PackageLayout(
            files={**layout.files, "notes.safetensors": layout.files[ROUTER_FILE]}
        )
    elif case == "file larger than its limit":
        entry = layout.files[ROUTER_FILE]
        big = entry.model_copy(
            update={"size": 10**12, "segments": [SegmentRef(sha256=first, size=10**12)]}
        )
        layout = PackageLayout(files={**layout.files, ROUTER_FILE: big})
    parts = _delta_parts(directory, layout, segments, whole)
    if case == "layout is not json":
        parts = [
            p if p[0] != "layout" else ("layout", ("layout.json", b"{not json")) for p in parts
        ]
    elif case == "segments without a layout":
        parts = [p for p in parts if p[0] != "layout"]
    elif case == "segment not named by a digest":
        parts.append(("segments", ("../../etc/passwd", b"x")))

    response = client.post("/api/v1/experts", headers=alice, files=parts)

    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    if check is not None:
        assert detail["check"] == check
    assert detail["message"]
    assert client.get("/api/v1/experts/alice/malformed").status_code == 404  # nothing published
    assert not any(app.state.settings.upload_tmp_dir.iterdir())  # temp files gone


def test_a_well_formed_delta_upload_of_every_segment_publishes(client, alice, package, base_spec):
    directory = package("alice/allsegments")
    names = (ADAPTER_WEIGHTS_FILE, ROUTER_FILE)
    segments = {
        **_segment_bytes(directory / ADAPTER_WEIGHTS_FILE),
        **_segment_bytes(directory / ROUTER_FILE),
    }
    parts = _delta_parts(directory, _layout_of(directory, *names), segments, JSON_FILES)

    response = client.post("/api/v1/experts", headers=alice, files=parts)

    assert response.status_code == 201, response.text
    for filename, data in stored_bytes(directory, base_spec).items():
        assert _download(client, "alice/allsegments@1", filename) == data


# ------------------------------------------------------------------ which blobs are missing


def test_missing_blobs_names_what_the_catalog_lacks(app, client, alice, package):
    directory = package("alice/asked")
    body = upload(client, alice, directory).json()
    router = cut_file(directory / ROUTER_FILE)
    manifest = next(f["sha256"] for f in body["files"] if f["filename"] == "expert.json")
    unknown = hashlib.sha256(b"nobody has this").hexdigest()
    asked = [router.segments[1].sha256, manifest, unknown, router.sha256, unknown]

    response = client.post("/api/v1/blobs/missing", headers=alice, json={"sha256": asked})

    assert response.status_code == 200, response.text
    assert response.json() == {"missing": [unknown]}


def test_missing_blobs_needs_a_publishing_token_and_bounds_the_question(app, client, alice):
    digest = "a" * 64
    assert client.post("/api/v1/blobs/missing", json={"sha256": [digest]}).status_code == 401
    worker = bearer_headers(app, "gpu-site", Role.WORKER)
    assert (
        client.post("/api/v1/blobs/missing", headers=worker, json={"sha256": [digest]}).status_code
        == 403
    )
    bad = client.post("/api/v1/blobs/missing", headers=alice, json={"sha256": ["../x"]})
    assert bad.status_code == 422
    many = client.post("/api/v1/blobs/missing", headers=alice, json={"sha256": [digest] * 10_001})
    assert many.status_code in (413, 422)


def test_a_coordinator_without_delta_uploads_gets_the_whole_package(url, alice, package):
    """An older coordinator answers 404 to the question: the push sends every file whole."""
    seen: list[str] = []
    inner = httpx.HTTPTransport()

    class OlderCoordinator(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request.url.path)
            if request.url.path.endswith("/blobs/missing"):
                return httpx.Response(404, json={"detail": "Not Found"})
            return inner.handle_request(request)

    token = alice["Authorization"].removeprefix("Bearer ")
    reply = push_package(
        package("alice/older"),
        url,
        token,
        transport=OlderCoordinator(),
        progress=False,
    )

    assert seen == ["/api/v1/blobs/missing", "/api/v1/experts"]
    assert reply["transfer"]["delta"] is False and reply["ref"] == "alice/older@1"


# ------------------------------------------------------------------ garbage


def _age(store: LocalBlobStore, sha256: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(store.path(sha256), (then, then))


def test_blobs_no_catalog_file_needs_are_collected_once_old(
    make_app, app, client, alice, package, tmp_path
):
    assert upload(client, alice, package("alice/kept")).status_code == 201
    store = LocalBlobStore(app.state.settings.blob_dir)
    kept = set(store.iter_blobs())
    for sha256 in kept:
        _age(store, sha256, 3600)  # old, but needed: never collected
    orphans = []
    for text in (b"an upload killed before its commit", b"a younger one"):
        (tmp_path / "orphan").write_bytes(text)
        orphans.append(store.put_file(tmp_path / "orphan").sha256)
    _age(store, orphans[0], 3600)

    settings = app.state.settings.model_copy(update={"stale_temp_seconds": 600})
    report = make_app(settings).state.startup_report

    assert report.removed_blobs == [orphans[0]]
    assert set(store.iter_blobs()) == kept | {orphans[1]}
    assert report.healthy


def test_offering_a_stored_blob_again_refreshes_it(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    (tmp_path / "f").write_bytes(b"bytes")
    sha256 = store.put_file(tmp_path / "f").sha256
    _age(store, sha256, 3600)
    before = store.stored_at(sha256)

    store.put_file(tmp_path / "f", expected_sha256=sha256)

    after = store.stored_at(sha256)
    assert before is not None and after is not None and after > before + 3000
    store.remove(sha256)
    assert store.stored_at(sha256) is None and not store.exists(sha256)
    store.remove(sha256)  # gone already is fine


# ------------------------------------------------------------------ catalogs stored before


def _cli(settings: Any, *arguments: str) -> Any:
    common = [
        "--data-dir",
        str(settings.data_dir),
        "--database-url",
        settings.resolved_database_url,
    ]
    return CliRunner().invoke(cli, [*arguments, *common], env={"COLUMNS": "400"})


def test_split_blobs_moves_a_catalog_stored_whole_into_pieces_and_back(
    app, client, alice, package, tmp_path, base_spec, monkeypatch
):
    monkeypatch.delenv("PHATGOOSE_BLOB_URL", raising=False)
    settings = app.state.settings
    directory = package("alice/legacy")
    assert upload(client, alice, directory).status_code == 201
    served = stored_bytes(directory, base_spec)
    store = LocalBlobStore(settings.blob_dir)

    # As a catalog uploaded before migration 0007 is: every file one blob.
    joined = _cli(settings, "split-blobs", "--join")
    assert joined.exit_code == 0, joined.output
    assert "2 file(s) stored whole again" in joined.output
    with app.state.sessionmaker() as session:
        assert needed_blobs(session) == {f.sha256 for f in _files(session)}
    assert set(store.iter_blobs()) >= needed_blobs_of(app)
    for filename, data in served.items():
        assert _download(client, "alice/legacy@1", filename) == data

    split = _cli(settings, "split-blobs")
    assert split.exit_code == 0, split.output
    assert "2 file(s) stored in pieces" in split.output
    with app.state.sessionmaker() as session:
        stored = stored_files(session, [(f.sha256, f.size) for f in _files(session)])
    assert sum(not s.whole for s in stored.values()) == 2
    for filename, data in served.items():
        assert _download(client, "alice/legacy@1", filename) == data
    # Run again: nothing left to do, and the store holds exactly what the catalog needs.
    again = _cli(settings, "split-blobs")
    assert "0 file(s) stored in pieces" in again.output
    assert set(store.iter_blobs()) == needed_blobs_of(app)


def needed_blobs_of(app: Any) -> set[str]:
    with app.state.sessionmaker() as session:
        return needed_blobs(session)


def _files(session: Any) -> list[Any]:
    return list(session.scalars(select(ExpertFile)))
