"""Publishing benchmark results: a method's hyper-parameters become its release's."""

import pytest

from benchmarks.catalog import BenchmarkCatalog, publish
from coordinator.releases import service as releases
from protocol import resolve_params
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama

RESULT = {"accuracy": 0.5, "stderr": 0.25, "n": 4, "seconds": 0.1, "precision": "float32"}


@pytest.fixture
def catalog(tmp_path):
    with BenchmarkCatalog(tmp_path / "catalog") as opened:
        yield opened


@pytest.fixture
def refs(catalog) -> dict[str, str]:
    """Two experts of different ranks in the catalog (TIES and DARE take them)."""
    model = tiny_llama()
    catalog.ensure_base_model(model, "tiny")
    return {
        name: catalog.register(
            random_expert(model, name=name, rank=rank, seed=seed), f"{seed:016x}"
        )
        for name, rank, seed in (("alpha", 2, 0), ("beta", 4, 1))
    }


def record(refs, methods):
    return {
        "config": {
            "base_model": "tiny",
            "top_k": 2,
            "n_eval": 4,
            "split_seed": 0,
            "max_length": 32,
        },
        "tasks": {"alpha": {"held_in": True}},
        "experts": [{"name": name, "ref": ref} for name, ref in refs.items()],
        "methods": {
            method: {"tasks": {"alpha": RESULT}, **({"params": params} if params else {})}
            for method, params in methods.items()
        },
    }


def release_params(catalog, number):
    with catalog.session() as session:
        release = releases.get_release(session, number)
        assert release.manifest["method_params"] == release.method_params
        return release.method_params


def test_a_method_run_with_its_defaults_publishes_them(catalog, refs):
    published = publish(catalog, record(refs, {"ties": None, "dare": None, "spectr": None}))
    for method in ("ties", "dare", "spectr"):
        assert release_params(catalog, published["releases"][method]) == resolve_params(method)


def test_the_params_a_run_records_are_its_releases(catalog, refs):
    published = publish(catalog, record(refs, {"ties": {"density": 0.5}}))
    assert release_params(catalog, published["releases"]["ties"]) == {"density": 0.5, "scale": 1.0}


def test_publishing_again_reuses_the_release_of_the_same_params_only(catalog, refs):
    first = publish(catalog, record(refs, {"ties": None}))["releases"]["ties"]
    assert publish(catalog, record(refs, {"ties": {"density": 0.2}}))["releases"]["ties"] == first
    other = publish(catalog, record(refs, {"ties": {"density": 0.5}}))["releases"]["ties"]
    assert other != first
    assert release_params(catalog, other)["density"] == 0.5
