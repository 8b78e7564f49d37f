"""phatgoose.load_release from a release directory: the routed model it builds, and what
it refuses (a changed file, another base model, a format it does not read)."""

import hashlib
import json

import pytest
import torch

from phatgoose.models import model_fingerprint
from phatgoose.release import ReleaseError, load_release, read_release_manifest
from phatgoose.routing import build_routed_model, routing_state
from protocol import RELEASE_FILE, RELEASE_FORMAT_VERSION, ROUTER_NUMERICS, package_digest
from protocol.methods import resolve_params
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama, tiny_tokenizer

NAMES = ("alice/a", "bob/b", "carol/c")


def write_release(
    directory,
    experts,
    method="phatgoose",
    top_k=2,
    expert=None,
    *,
    format_version=RELEASE_FORMAT_VERSION,
    method_params=None,
):
    """A release directory as the coordinator exports it, written by hand; `method_params`
    default to the method's defaults (format_version 3 records them)."""
    entries = []
    for e in experts:
        namespace, name = e.name.split("/")
        entry = {
            "ref": f"{e.name}@1",
            "namespace": namespace,
            "name": name,
            "version": 1,
            "path": f"experts/{namespace}/{name}/1",
        }
        package = e.save(directory / entry["path"])
        entry["files"] = files = [
            {
                "filename": p.name,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                "size": p.stat().st_size,
                "url": f"/unused/{p.name}",
            }
            for p in sorted(package.iterdir())
        ]
        entry["package_digest"] = package_digest({f["filename"]: f["sha256"] for f in files})
        entries.append(entry)
    base = tiny_llama()
    manifest = {
        "format": "phatgoose-release",
        "format_version": format_version,
        "number": 1,
        "method": method,
        "top_k": top_k,
        "expert": expert,
        "base_model": {"name": "tiny", "revision": None, "fingerprint": model_fingerprint(base)},
        "experts": entries,
    }
    if format_version >= 2:
        manifest["router_numerics"] = ROUTER_NUMERICS
    if format_version >= 3:
        manifest["method_params"] = resolve_params(method, method_params)
    (directory / RELEASE_FILE).write_text(json.dumps(manifest))
    return directory


@pytest.fixture
def experts():
    model = tiny_llama()
    return [random_expert(model, name=n, rank=4, seed=z) for z, n in enumerate(NAMES)]


def logits(model):
    input_ids = torch.randint(4, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize(
    ("method", "top_k", "expert"),
    [
        ("phatgoose", 2, None),
        ("phatgoose_example", 2, None),
        ("smear", None, None),
        ("arrow", 1, None),
        ("spectr", 2, None),
        ("merged", None, None),
        ("single", None, "bob/b"),
    ],
)
def test_directory_release_gives_the_logits_of_build_routed_model(
    tmp_path, experts, method, top_k, expert
):
    write_release(tmp_path, experts, method=method, top_k=top_k, expert=expert)
    model, _ = load_release(tmp_path, base_model=(tiny_llama(), tiny_tokenizer()))
    reference = build_routed_model(
        tiny_llama(), experts, method=method, top_k=top_k or 1, expert=expert
    )
    assert torch.equal(logits(model), logits(reference))
    assert not torch.equal(logits(model), logits(tiny_llama()))
    state = routing_state(model)
    assert (state.method, state.expert_names) == (method, list(NAMES))


def test_a_release_builds_its_method_with_the_params_it_records(tmp_path, experts):
    params = {"density": 0.5, "scale": 1.0}
    write_release(tmp_path, experts, method="ties", top_k=None, method_params=params)
    model, _ = load_release(tmp_path, base_model=(tiny_llama(), tiny_tokenizer()))
    assert routing_state(model).params == params
    reference = build_routed_model(tiny_llama(), experts, method="ties", params=params)
    assert torch.equal(logits(model), logits(reference))
    with_defaults = build_routed_model(tiny_llama(), experts, method="ties")
    assert not torch.equal(logits(model), logits(with_defaults))


def test_a_format_version_2_release_builds_its_method_with_the_defaults(tmp_path, experts):
    write_release(tmp_path, experts, method="merged", top_k=None, format_version=2)
    assert read_release_manifest(tmp_path).method_params == {}
    model, _ = load_release(tmp_path, base_model=(tiny_llama(), tiny_tokenizer()))
    assert routing_state(model).params == {}
    reference = build_routed_model(tiny_llama(), experts, method="merged")
    assert torch.equal(logits(model), logits(reference))


def test_a_release_routes_with_the_numerics_it_was_made_with(tmp_path, experts):
    write_release(tmp_path, experts, format_version=1)  # made before router_numerics 2
    model, _ = load_release(tmp_path, base_model=(tiny_llama(), tiny_tokenizer()))
    assert routing_state(model).router_numerics == 1
    old = build_routed_model(tiny_llama(), experts, top_k=2, router_numerics=1)
    assert torch.equal(logits(model), logits(old))


def test_release_json_path_works_like_its_directory(tmp_path, experts):
    write_release(tmp_path, experts)
    model, _ = load_release(tmp_path / RELEASE_FILE, base_model=(tiny_llama(), tiny_tokenizer()))
    assert routing_state(model).top_k == 2


def test_experts_are_named_by_the_release_not_their_manifest(tmp_path):
    model = tiny_llama()
    experts = [random_expert(model, name="same", rank=2, seed=z) for z in range(2)]
    for e, full in zip(experts, ("alice/same", "bob/same"), strict=True):
        e.manifest = e.manifest.model_copy(update={"name": full})
    write_release(tmp_path, experts)
    manifest = json.loads((tmp_path / RELEASE_FILE).read_text())
    for entry in manifest["experts"]:  # package manifests both say "same"
        (tmp_path / entry["path"] / "expert.json").write_text(
            (tmp_path / entry["path"] / "expert.json")
            .read_text()
            .replace(entry["ref"][:-2], "same")
        )
        for file in entry["files"]:
            if file["filename"] == "expert.json":
                data = (tmp_path / entry["path"] / "expert.json").read_bytes()
                file["sha256"] = hashlib.sha256(data).hexdigest()
        entry["package_digest"] = package_digest(
            {f["filename"]: f["sha256"] for f in entry["files"]}
        )
    (tmp_path / RELEASE_FILE).write_text(json.dumps(manifest))
    routed, _ = load_release(tmp_path, base_model=(tiny_llama(), tiny_tokenizer()))
    assert routing_state(routed).expert_names == ["alice/same", "bob/same"]


def test_a_changed_file_is_refused(tmp_path, experts):
    write_release(tmp_path, experts)
    gate_file = tmp_path / "experts/bob/b/1/router.safetensors"
    gate_file.write_bytes(gate_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(ReleaseError, match=r"bob/b@1: .*router\.safetensors does not match"):
        load_release(tmp_path, base_model=(tiny_llama(), tiny_tokenizer()))


def test_another_base_model_is_refused(tmp_path, experts):
    write_release(tmp_path, experts)
    with pytest.raises(ReleaseError, match="not the release's base model 'tiny'"):
        load_release(tmp_path, base_model=(tiny_llama(seed=1), tiny_tokenizer()))


def test_base_model_by_path_is_loaded_and_checked(tmp_path, experts):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    write_release(tmp_path / "release", experts)
    model, tokenizer = load_release(tmp_path / "release", base_model=str(base_dir))
    reference = build_routed_model(tiny_llama(), experts, top_k=2)
    assert torch.allclose(logits(model), logits(reference))
    assert tokenizer.eos_token == "</s>"


def test_an_unknown_format_version_is_refused(tmp_path, experts):
    write_release(tmp_path, experts)
    manifest = json.loads((tmp_path / RELEASE_FILE).read_text())
    manifest["format_version"] = RELEASE_FORMAT_VERSION + 1
    (tmp_path / RELEASE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="format_version 4 is not supported"):
        read_release_manifest(tmp_path)


def test_a_malformed_manifest_is_refused_naming_the_file_and_field(tmp_path, experts):
    write_release(tmp_path, experts)
    manifest = json.loads((tmp_path / RELEASE_FILE).read_text())
    manifest["experts"][1]["package_digest"] = "md5:abc"
    (tmp_path / RELEASE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError) as refused:
        read_release_manifest(tmp_path)
    assert str(refused.value).startswith(
        f"{tmp_path / RELEASE_FILE}: release manifest field 'experts.1.package_digest' is invalid"
    )


def test_the_manifest_is_read_into_typed_fields(tmp_path, experts):
    write_release(tmp_path, experts, method="single", top_k=None, expert="bob/b")
    manifest = read_release_manifest(tmp_path)
    assert (manifest.method, manifest.top_k, manifest.expert) == ("single", None, "bob/b")
    assert [e.path for e in manifest.experts] == [f"experts/{n}/1" for n in NAMES]


def test_a_directory_without_release_json_is_refused(tmp_path):
    with pytest.raises(ReleaseError, match="no release manifest"):
        read_release_manifest(tmp_path)


def test_load_release_is_exported_from_the_package():
    import phatgoose

    assert phatgoose.load_release is load_release
