"""The diff page `/ui/experts/{ns}/{name}/{version}/diff`: the summary, the per-layer plot and
the per-module table of `protocol.diff`, linked from the expert's page."""

from __future__ import annotations

import re

import pytest

from coordinator.experts.diff import DIFF_CACHE
from coordinator.web import plots
from tests.coordinator.release_helpers import publish
from tests.coordinator.web_helpers import png_size, table_rows

PAGE = "/ui/experts/alice/demo/2/diff"


@pytest.fixture(autouse=True)
def _fresh_caches():
    DIFF_CACHE.clear()
    plots.PNG_CACHE.clear()
    yield
    DIFF_CACHE.clear()


@pytest.fixture
def two_versions(client, alice, tiny_base, tmp_path) -> dict:
    """alice/demo@1 and @2 (other random weights); the API's diff of the two."""
    publish(client, alice, tiny_base, tmp_path / "v1", "alice/demo", seed=0)
    publish(client, alice, tiny_base, tmp_path / "v2", "alice/demo", seed=1)
    response = client.get("/api/v1/experts/alice/demo/2/diff")
    assert response.status_code == 200, response.text
    return response.json()["diff"]


def test_the_page_shows_the_summary_numbers(client, two_versions):
    response = client.get(PAGE)

    assert response.status_code == 200, response.text
    html = response.text
    summary = two_versions["summary"]
    assert "alice/demo@2" in html and "against alice/demo@1" in html
    assert re.search(rf'id="modules-changed">{summary["modules_changed"]}<', html)
    assert f'id="median-change">{summary["median_relative_change"]:.4g}<' in html
    assert f'id="mean-gate-cosine">{summary["mean_gate_cosine"]:.4g}<' in html
    files = {row[0]: row[1] for row in table_rows(html, "diff-files")}
    assert files == {
        "adapter_config.json": "identical",  # the same rank and alpha, canonically stored
        "adapter_model.safetensors": "differ",
        "expert.json": "differ",
        "router.safetensors": "differ",
    }


def test_the_page_lists_every_module_and_layer(client, two_versions):
    html = client.get(PAGE).text

    modules = table_rows(html, "diff-modules")
    assert [row[0] for row in modules] == [m["path"] for m in two_versions["modules"]]
    first = two_versions["modules"][0]
    assert modules[0][5] == f"{first['relative_change']:.4g}"
    assert modules[0][6] == f"{first['gate_cosine']:.4g}"
    layers = table_rows(html, "diff-layers")
    assert [row[0] for row in layers] == ["model.layers.0", "model.layers.1"]
    assert layers[0][5] == f"{two_versions['layers'][0]['mean_relative_change']:.4g}"


def test_the_per_layer_plot_is_a_png(client, two_versions):
    html = client.get(PAGE).text
    source = re.search(r'id="diff-plot" src="([^"]+)"', html)
    assert source is not None

    response = client.get(source.group(1))

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    width, height = png_size(response.content)
    assert width > 400 and height > 300
    again = client.get(source.group(1), headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304


def test_the_expert_page_links_each_later_version_to_its_diff(client, two_versions):
    html = client.get("/ui/experts/alice/demo").text

    links = re.findall(r'class="diff-link" href="([^"]+)"', html)
    assert links == ["/ui/experts/alice/demo/2/diff"]


def test_another_reference_is_compared_when_asked(client, two_versions):
    html = client.get(PAGE, params={"against": "alice/demo@2"}).text

    assert 'id="modules-changed">0<' in html
    assert "against alice/demo@2" in html


def test_the_first_version_has_no_previous_one(client, two_versions):
    response = client.get("/ui/experts/alice/demo/1/diff")

    assert response.status_code == 404
    assert "first version" in response.text


def test_a_malformed_reference_is_explained(client, two_versions):
    response = client.get(PAGE, params={"against": "not a ref"})

    assert response.status_code == 422
    assert 'id="diff-error"' in response.text
    assert "is not a version reference" in response.text
