"""`load_release` against a hostile coordinator (a real HTTP server on loopback that says
whatever the test scripts) and hostile release directories: nothing the server or the
manifest says can make it write outside its cache, send the token to another origin, take
more bytes than declared, or load a package that fails admission."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phatgoose import release as release_module
from phatgoose.release import ReleaseError, load_release, read_release_manifest
from phatgoose.routing import build_routed_model
from protocol import RELEASE_FILE
from tests.phatgoose.experts import random_expert
from tests.phatgoose.hostile_server import (
    RELEASE_PATH,
    HostileServer,
    Reply,
    hostile_server,
    serve_release,
)
from tests.tiny import tiny_llama, tiny_tokenizer

TOKEN = "pg_0123456789abcdef_" + "s" * 40


@pytest.fixture(scope="module")
def experts():
    model = tiny_llama()
    return [random_expert(model, name=n, rank=4, seed=z) for z, n in enumerate(("a/x", "b/y"))]


@pytest.fixture
def servers():
    with hostile_server() as release_server, hostile_server() as elsewhere:
        yield release_server, elsewhere


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def load(server: HostileServer, cache: Path, **kwargs):
    return load_release(
        server.url + RELEASE_PATH,
        base_model=(tiny_llama(), tiny_tokenizer()),
        token=TOKEN,
        cache_dir=cache,
        **kwargs,
    )


def logits(model):
    input_ids = torch.randint(4, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_an_honest_server_loads_and_the_token_goes_only_there(servers, experts, tmp_path):
    server, elsewhere = servers
    serve_release(server, experts, tiny_llama(), tmp_path / "served")
    model, _ = load(server, tmp_path / "cache")
    reference = build_routed_model(tiny_llama(), experts, method="phatgoose", top_k=1)
    assert torch.equal(logits(model), logits(reference))
    assert {seen.authorization for seen in server.seen} == {f"Bearer {TOKEN}"}
    assert elsewhere.seen == []


@pytest.mark.parametrize("form", ["absolute", "scheme-relative", "backslash"])
def test_file_urls_on_another_origin_are_refused_and_get_no_request(
    servers, experts, tmp_path, form
):
    server, elsewhere = servers
    manifest = serve_release(server, experts, tiny_llama(), tmp_path / "served")
    host = elsewhere.url.removeprefix("http://")
    url = {"absolute": f"http://{host}/x", "scheme-relative": f"//{host}/x"}.get(form, "/\\x")
    manifest["experts"][0]["files"][0]["url"] = url
    server.json(RELEASE_PATH + "/manifest", manifest)
    with pytest.raises(ReleaseError, match="url"):
        load(server, tmp_path / "cache")
    assert elsewhere.seen == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("what", ["manifest", "status", "file"])
def test_redirects_off_the_origin_are_not_followed(servers, experts, tmp_path, what):
    server, elsewhere = servers
    manifest = serve_release(server, experts, tiny_llama(), tmp_path / "served")
    path = {
        "manifest": RELEASE_PATH + "/manifest",
        "status": RELEASE_PATH,
        "file": manifest["experts"][1]["files"][0]["url"],
    }[what]
    server.replies[path] = Reply(status=302, headers={"Location": elsewhere.url + "/stolen"})
    with pytest.raises(ReleaseError, match="off the release's server"):
        load(server, tmp_path / "cache")
    assert elsewhere.seen == []


def test_redirects_within_the_origin_are_followed(servers, experts, tmp_path):
    server, _ = servers
    manifest = serve_release(server, experts, tiny_llama(), tmp_path / "served")
    file = manifest["experts"][0]["files"][0]
    server.replies["/moved"] = server.replies[file["url"]]
    server.replies[file["url"]] = Reply(status=307, headers={"Location": "/moved"})
    load(server, tmp_path / "cache")
    assert {s.authorization for s in server.seen if s.path == "/moved"} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("package_digest", "sha256:../../../../escaped"),
        ("package_digest", "sha256:/tmp/escaped"),
        ("package_digest", "sha256:" + "0" * 64),  # a well-formed digest of other files
        ("filename", "../../escaped.pth"),
        ("filename", "/tmp/escaped.pth"),
        ("sha256", "../" * 21 + "a"),
        ("size", -1),
        ("path", "../../escaped"),
    ],
)
def test_hostile_manifest_values_are_refused_before_anything_is_written(
    servers, experts, tmp_path, field, value
):
    server, _ = servers
    manifest = serve_release(server, experts, tiny_llama(), tmp_path / "served")
    target = manifest["experts"][0]
    if field in ("filename", "sha256", "size"):
        target["files"][0][field] = value
    else:
        target[field] = value
    server.json(RELEASE_PATH + "/manifest", manifest)
    before = files_under(tmp_path)
    with pytest.raises(ReleaseError):
        load(server, tmp_path / "cache")
    assert files_under(tmp_path) == before
    assert not any(seen.path.startswith("/files/") for seen in server.seen)


def test_a_body_longer_than_declared_is_cut_off_and_never_cached(servers, experts, tmp_path):
    server, _ = servers
    manifest = serve_release(server, experts, tiny_llama(), tmp_path / "served")
    file = manifest["experts"][0]["files"][0]
    honest = server.replies[file["url"]].body
    # No Content-Length the client could check first: the lie shows only while streaming.
    server.replies[file["url"]] = Reply(body=honest + b"x" * 5_000_000, omit_length=True)
    with pytest.raises(ReleaseError, match=f"more than the {file['size']} bytes"):
        load(server, tmp_path / "cache")
    assert [p for p in files_under(tmp_path / "cache") if p.is_file()] == []


def test_a_declared_size_over_the_admission_limit_is_refused_before_downloading(
    servers, experts, tmp_path
):
    server, _ = servers
    manifest = serve_release(server, experts, tiny_llama(), tmp_path / "served")
    manifest["experts"][0]["files"][0]["size"] = 2**40
    server.json(RELEASE_PATH + "/manifest", manifest)
    with pytest.raises(ReleaseError, match="declared as 1099511627776 bytes"):
        load(server, tmp_path / "cache")
    assert not any(seen.path.startswith("/files/") for seen in server.seen)


def test_a_manifest_bigger_than_allowed_is_refused_while_streaming(servers, tmp_path, monkeypatch):
    server, _ = servers
    monkeypatch.setattr(release_module, "MAX_JSON_BYTES", 1000)
    server.replies[RELEASE_PATH + "/manifest"] = Reply(body=b" " * 5000, omit_length=True)
    with pytest.raises(ReleaseError, match="more than the 1000 bytes"):
        read_release_manifest(server.url + RELEASE_PATH)


def test_a_slow_body_is_given_up(servers, experts, tmp_path, monkeypatch):
    server, _ = servers
    manifest = serve_release(server, experts, tiny_llama(), tmp_path / "served")
    url = manifest["experts"][0]["files"][0]["url"]
    server.replies[url].chunk_delay = 0.05
    monkeypatch.setattr(release_module, "MIN_TRANSFER_RATE", 10**12)  # no allowance for size
    with pytest.raises(ReleaseError, match="too slow"):
        load(server, tmp_path / "cache", timeout=0.3)


def test_a_package_that_fails_admission_is_refused_even_with_matching_hashes(
    servers, experts, tmp_path
):
    """A hostile server can list any sha256 it likes: the bytes are checked as admission
    checks an upload (here a gate scaled to capture every token)."""
    server, _ = servers
    gates = {p: g * 1e6 for p, g in experts[0].gates.items()}
    captured = experts[0].with_gates(gates, gate_steps=100)
    serve_release(server, [captured, experts[1]], tiny_llama(), tmp_path / "served")
    with pytest.raises(ReleaseError, match="fails validation"):
        load(server, tmp_path / "cache")


def test_a_withdrawn_release_or_a_yanked_expert_is_refused_unless_allowed(
    servers, experts, tmp_path, caplog
):
    server, _ = servers
    serve_release(server, experts, tiny_llama(), tmp_path / "served")
    status = {"number": 1, "withdrawn": True, "withdrawn_reason": "poisoned"}
    server.json(RELEASE_PATH, {**status, "yanked_experts": ["a/x@1"]})
    with pytest.raises(ReleaseError, match=r"withdrawn \('poisoned'\).*yanked expert\(s\) a/x@1"):
        load(server, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="phatgoose.release"):
        load(server, tmp_path / "cache", allow_yanked=True)
    assert "loading it because allow_yanked=True" in caplog.text


def test_a_release_directory_cannot_lead_outside_itself(experts, tmp_path):
    """A symbolic link in an exported release pointing elsewhere is refused, even when the
    bytes there match."""
    outside = tmp_path / "outside"
    release = tmp_path / "release"
    with hostile_server() as server:
        manifest = serve_release(server, experts, tiny_llama(), outside)
    for entry in manifest["experts"]:
        entry["path"] = f"experts/{entry['namespace']}/{entry['name']}/1"
        folder = release / entry["path"]
        folder.mkdir(parents=True)
        for file in entry["files"]:
            os.symlink(
                outside / entry["namespace"] / entry["name"] / file["filename"],
                folder / file["filename"],
            )
    (release / RELEASE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="leads outside the release directory"):
        load_release(release, base_model=(tiny_llama(), tiny_tokenizer()))


# --- property: whatever the server says --------------------------------------------------

HOSTILE_STRINGS = [
    "../../escaped",
    "/etc/passwd",
    "//127.0.0.1:1/x",
    "http://127.0.0.1:1/x",
    "\\\\host\\share",
    "a\x00b",
    "a\r\nb",
    "sha256:" + "0" * 64,
    "x" * 5000,
    "",
    "é",
]
HOSTILE_VALUES = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=3),
)


def replies(elsewhere: str) -> st.SearchStrategy[Reply]:
    locations = ["/", "//" + elsewhere.removeprefix("http://") + "/x", elsewhere + "/", "", "\x00"]
    redirects = st.fixed_dictionaries({"Location": st.sampled_from(locations)})
    return st.one_of(
        st.builds(Reply, status=st.sampled_from([301, 302, 307, 308]), headers=redirects),
        st.builds(Reply, status=st.sampled_from([200, 204, 403, 500])),
        st.builds(Reply, body=st.binary(max_size=200), omit_length=st.booleans()),
        st.builds(Reply, body=st.just(b"{}"), declared_length=st.integers(0, 2**40)),
    )


def _paths(value, prefix=()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*prefix, index)
            yield from _paths(item, (*prefix, index))


def _replace(document, path, value) -> None:
    """Set the value at `path` if an earlier change left it there."""
    holder = document
    for key in path[:-1]:
        if not _has(holder, key):
            return
        holder = holder[key]
    if _has(holder, path[-1]):
        holder[path[-1]] = value


def _has(holder, key) -> bool:
    if isinstance(holder, dict):
        return key in holder
    return isinstance(holder, list) and isinstance(key, int) and key < len(holder)


REPORT = os.environ.get("PHATGOOSE_RELEASE_FUZZ_REPORT")
TALLY: dict[str, dict[str, int]] = {}


def _tally(kind: str, outcome: str) -> None:
    """Count outcomes by what was broken; `benchmarks/fuzz_long.py --suite release` reads
    them from the `PHATGOOSE_RELEASE_FUZZ_REPORT` file."""
    counts = TALLY.setdefault(kind, {})
    counts[outcome] = counts.get(outcome, 0) + 1
    if REPORT:
        cases = sum(sum(c.values()) for c in TALLY.values())
        entry = {"database": "loopback", "cases": cases, "done": True, "by_label": TALLY}
        Path(REPORT).write_text(json.dumps([entry]))


@settings(
    max_examples=int(os.environ.get("PHATGOOSE_FUZZ_EXAMPLES", "0")) or 60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_whatever_the_server_says_nothing_escapes(data, servers, experts, tmp_path_factory):
    """Break one or two manifest values and one reply at random: the load either works or
    is a `ReleaseError`; nothing is written outside the cache; nothing reaches another
    origin; the token goes only to the release's server."""
    server, elsewhere = servers
    server.replies.clear()
    server.seen.clear()
    folder = tmp_path_factory.mktemp("fuzz")
    honest = serve_release(server, experts, tiny_llama(), folder / "served")
    manifest = copy.deepcopy(honest)
    targets = sorted(_paths(manifest), key=str)
    other_origin = [elsewhere.url + "/x", "//" + elsewhere.url.removeprefix("http://") + "/x"]
    values = st.one_of(HOSTILE_VALUES, st.sampled_from(other_origin))
    for _ in range(data.draw(st.integers(0, 2))):
        _replace(manifest, data.draw(st.sampled_from(targets)), data.draw(values))
    server.json(RELEASE_PATH + "/manifest", manifest)
    broke_reply = data.draw(st.booleans())
    if broke_reply:
        paths = [RELEASE_PATH + "/manifest", RELEASE_PATH, *list(server.replies)]
        server.replies[data.draw(st.sampled_from(paths))] = data.draw(replies(elsewhere.url))
    kind = ("manifest" if manifest != honest else "") + ("+reply" if broke_reply else "")
    before = files_under(folder)
    outcome = "refused"
    with contextlib.suppress(ReleaseError):
        load(server, folder / "cache")
        outcome = "loaded"
    _tally(kind or "honest", outcome)
    written = {p for p in files_under(folder) - before if not p.is_relative_to(folder / "cache")}
    assert written == set()
    assert elsewhere.seen == []
    assert {s.authorization for s in server.seen} <= {f"Bearer {TOKEN}"}
