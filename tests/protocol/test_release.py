"""The release manifest: what the coordinator writes and the library reads, and every
malformed or foreign manifest refused with the field it trips on."""

import pytest

from protocol import (
    RELEASE_FORMAT_VERSION,
    REQUIRED_FILES,
    TOP_K_METHODS,
    InvalidReleaseManifest,
    ReleaseManifest,
    expert_package_path,
    package_digest,
    parse_release_manifest,
    resolve_params,
)

DIGEST = "sha256:" + "ab" * 32


def expert_entry(namespace="alice", name="demo", version=2):
    files = [
        {
            "filename": filename,
            "sha256": f"{z:064x}",
            "size": 10 + z,
            "url": f"/api/v1/experts/{namespace}/{name}/{version}/files/{filename}",
        }
        for z, filename in enumerate(sorted(REQUIRED_FILES))
    ]
    return {
        "ref": f"{namespace}/{name}@{version}",
        "namespace": namespace,
        "name": name,
        "version": version,
        "package_digest": package_digest({f["filename"]: f["sha256"] for f in files}),
        "rank": 4,
        "modules": 12,
        "path": f"experts/{namespace}/{name}/{version}",
        "files": files,
    }


def manifest(**changes):
    data = {
        "format": "phatgoose-release",
        "format_version": 3,
        "number": 3,
        "method": "phatgoose",
        "top_k": 2,
        "method_params": {},
        "router_numerics": 2,
        "expert": None,
        "base_model": {
            "name": "tiny",
            "revision": None,
            "fingerprint": DIGEST,
            "architecture": "llama",
        },
        "experts": [expert_entry(), expert_entry("bob", "math", 1)],
        "notes": "",
        "created_by": "carol",
        "created_at": "2026-01-02T03:04:05.678901Z",
    }
    return {**data, **changes}


def older(format_version, **changes):
    """A manifest as format_version 1 or 2 wrote it: no method_params (nor, in 1,
    router_numerics)."""
    data = manifest(format_version=format_version, **changes)
    del data["method_params"]
    if format_version == 1:
        del data["router_numerics"]
    return data


TIES = {"method": "ties", "top_k": None}


def refusal(data):
    with pytest.raises(InvalidReleaseManifest) as refused:
        parse_release_manifest(data)
    return str(refused.value)


def test_a_manifest_reads_into_typed_fields_and_writes_back_the_same_json():
    parsed = parse_release_manifest(manifest())
    assert (parsed.method, parsed.top_k, parsed.base_model.fingerprint) == ("phatgoose", 2, DIGEST)
    assert [e.full_name for e in parsed.experts] == ["alice/demo", "bob/math"]
    assert parsed.model_dump(mode="json") == manifest()


def test_the_current_format_is_3():
    assert RELEASE_FORMAT_VERSION == 3


def test_a_newer_format_version_is_refused_naming_the_version():
    message = refusal(manifest(format_version=4, experts="changed in version 4"))
    assert message == (
        "release format_version 4 is not supported: this library reads format_version 1 "
        "to 3 (a newer phatgoose reads it)"
    )


def test_a_format_version_1_manifest_was_routed_with_router_numerics_1():
    assert parse_release_manifest(older(1)).router_numerics == 1


@pytest.mark.parametrize("format_version", [1, 2])
def test_an_older_manifest_reads_with_its_method_defaults(format_version):
    assert parse_release_manifest(older(format_version)).method_params == {}
    parsed = parse_release_manifest(older(format_version, **TIES))
    assert parsed.method_params == resolve_params("ties") == {"density": 0.2, "scale": 1.0}


@pytest.mark.parametrize("format_version", [1, 2])
def test_an_older_manifest_cannot_claim_method_params(format_version):
    data = older(format_version)
    data["method_params"] = {}
    assert refusal(data) == (
        f"method_params is not part of release format_version {format_version}"
    )


def test_a_manifest_records_its_method_params_as_given():
    params = {"density": 0.5, "scale": 2}
    parsed = parse_release_manifest(manifest(**TIES, method_params=params))
    assert parsed.method_params == params
    assert parsed.model_dump(mode="json")["method_params"] == params
    assert type(parsed.method_params["scale"]) is int


def test_format_version_3_must_say_its_method_params():
    data = manifest()
    del data["method_params"]
    assert refusal(data) == "release manifest field 'method_params' is missing"


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        (
            {**TIES, "method_params": {"density": 0.5}},
            "method_params: method 'ties': every parameter is recorded; missing scale "
            "(default 1.0)",
        ),
        (
            {**TIES, "method_params": {"density": 0.0, "scale": 1.0}},
            "method_params: method 'ties': parameter 'density' must be a number > 0 and <= 1, "
            "got 0.0",
        ),
        (
            {"method_params": {"density": 0.2}},
            "method_params: method 'phatgoose' has no parameter(s) 'density'; its parameters: none",
        ),
        (
            {
                "method": "dare",
                "top_k": None,
                "method_params": {"drop_rate": 0.9, "merge": "average", "scale": 1.0, "seed": 7.0},
            },
            "method_params: method 'dare': parameter 'seed' is recorded as 7, got 7.0",
        ),
        (
            {"method": "spectr", "method_params": {"score": "input", "weighting": "argmax"}},
            "method_params: method 'spectr': parameter 'weighting' must be one of 'uniform', "
            "'softmax', got 'argmax'",
        ),
    ],
)
def test_method_params_must_resolve_to_themselves(changes, refused):
    assert refusal(manifest(**changes)) == refused


def test_a_method_param_is_a_json_number_or_string_as_it_stands():
    message = refusal(manifest(**TIES, method_params={"density": True, "scale": 1.0}))
    assert message.startswith("release manifest field 'method_params.density")


def test_format_version_1_cannot_claim_other_router_numerics():
    assert refusal({**older(1), "router_numerics": 2}) == (
        "router_numerics is not part of release format_version 1"
    )


def test_format_version_2_must_say_its_router_numerics():
    data = manifest()
    del data["router_numerics"]
    assert refusal(data) == "release manifest field 'router_numerics' is missing"


def test_newer_router_numerics_are_refused_naming_them():
    assert refusal(manifest(router_numerics=3)) == (
        "router_numerics 3 is not supported: this library routes with 1 to 2 "
        "(a newer phatgoose reads it)"
    )


def test_another_format_is_refused_before_its_fields():
    assert refusal(manifest(format="something-else")).startswith(
        "not a release manifest: format is 'something-else'"
    )


def test_a_json_array_is_refused():
    assert refusal([manifest()]) == "a release manifest is a JSON object, got list"


def test_a_malformed_field_is_named_by_its_path():
    data = manifest()
    data["experts"][1]["files"][2]["sha256"] = "not-hex"
    message = refusal(data)
    assert message.startswith("release manifest field 'experts.1.files.2.sha256' is invalid")


def test_a_missing_field_is_named():
    data = manifest()
    del data["base_model"]["fingerprint"]
    assert refusal(data) == "release manifest field 'base_model.fingerprint' is missing"


def test_an_unknown_field_is_refused_as_not_in_the_format():
    assert refusal(manifest(signature="...")) == (
        "release manifest field 'signature' is not part of format_version 3"
    )


def test_a_file_outside_the_package_format_is_refused():
    data = manifest()
    data["experts"][0]["files"][0]["filename"] = "model.pkl"
    assert "filename 'model.pkl' is not a package file" in refusal(data)


def test_an_expert_lacking_a_required_file_is_refused():
    data = manifest()
    del data["experts"][0]["files"][3]
    assert refusal(data) == "experts.0: alice/demo@2 lacks the package file(s) router.safetensors"


def test_a_ref_that_is_not_namespace_name_version_is_refused():
    data = manifest()
    data["experts"][0]["ref"] = "alice/demo@1"
    assert "ref 'alice/demo@1' is not namespace/name@version (alice/demo@2)" in refusal(data)


def test_an_expert_path_defaults_to_its_place_in_an_exported_release():
    data = manifest()
    del data["experts"][1]["path"]
    parsed = parse_release_manifest(data)
    assert parsed.experts[1].path == expert_package_path("bob", "math", 1) == "experts/bob/math/1"


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        ({"top_k": None}, "method 'phatgoose' selects top_k experts and needs top_k"),
        ({"top_k": 3}, "top_k=3 but the release has 2 expert(s)"),
        ({"method": "merged"}, f"top_k is for {', '.join(TOP_K_METHODS)}, not 'merged'"),
        ({"method": "base", "top_k": None}, "method 'base' takes no experts, got 2"),
        ({"experts": []}, "method 'phatgoose' needs at least one expert"),
        ({"expert": "bob/math"}, "`expert` is for method 'single', not 'phatgoose'"),
        (
            {"method": "single", "top_k": None, "expert": "carol/x"},
            "method 'single' needs `expert` naming one of ['alice/demo', 'bob/math'], "
            "got 'carol/x'",
        ),
    ],
)
def test_the_manifest_fits_its_method(changes, refused):
    assert refusal(manifest(**changes)) == refused


def test_an_expert_appears_once():
    assert refusal(manifest(experts=[expert_entry(), expert_entry(version=3)])) == (
        "an expert may appear once per release: alice/demo"
    )


def test_single_names_one_of_its_experts():
    parsed = parse_release_manifest(manifest(method="single", top_k=None, expert="bob/math"))
    assert parsed.expert == "bob/math"


def test_the_model_refuses_the_same_way_when_built_directly():
    with pytest.raises(ValueError, match="format_version 4 is not supported"):
        ReleaseManifest.model_validate(manifest(format_version=4))


@pytest.mark.parametrize(
    "path",
    ["../../escaped", "/tmp/escaped", "experts/alice/demo/2/../../../x", "experts/bob/math/1"],
)
def test_an_expert_path_is_only_the_one_its_ref_names(path):
    data = manifest()
    data["experts"][0]["path"] = path
    assert f"path {path!r} must be 'experts/alice/demo/2'" in refusal(data)


def test_a_package_digest_must_be_the_digest_of_the_files_listed():
    data = manifest()
    data["experts"][0]["files"][0]["sha256"] = "f" * 64
    assert "is not the digest of its files' sha256" in refusal(data)


@pytest.mark.parametrize(
    "url",
    [
        "http://elsewhere.example/x",
        "//elsewhere.example/x",
        "/\\elsewhere.example/x",
        "files/x",
        "/x?token=1",
        "/x#y",
        "/x\r\nHost: elsewhere",
        "javascript:alert(1)",
        "/" + "x" * 3000,
    ],
)
def test_a_file_url_is_a_path_on_the_manifest_server(url):
    data = manifest()
    data["experts"][0]["files"][0]["url"] = url
    assert "experts.0.files.0.url" in refusal(data)
