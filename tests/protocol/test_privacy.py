"""The manifest's DP guarantee: its schema, admission's checks of it, a release's weakest."""

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import MANIFEST_FILE, BaseModelSpec, ExpertManifest, weakest_guarantee
from protocol.privacy import (
    PrivacyGuarantee,
    accounted_epsilon,
    default_delta,
    noise_multiplier_for,
)
from protocol.validation import PackageRejected, validate_directory
from tests.protocol.packages import base_spec, dp_guarantee, edit_json, write_package
from tests.tiny import tiny_llama


@pytest.fixture(scope="module")
def base() -> BaseModelSpec:
    return base_spec(tiny_llama())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, base: BaseModelSpec) -> Path:
    directory = tmp_path_factory.mktemp("private") / "expert"
    return write_package(directory, tiny_llama(), base, average_activation=False, dp_epsilon=8)


@pytest.fixture
def package(pristine: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "expert"))


def rejection(package: Path, base: BaseModelSpec) -> PackageRejected:
    with pytest.raises(PackageRejected) as info:
        validate_directory(package, base)
    return info.value


def test_the_accountant_and_the_noise_search_agree() -> None:
    noise = noise_multiplier_for(epsilon=8, delta=1e-5, sample_rate=0.02, steps=96)
    spent = accounted_epsilon(
        noise_multiplier=noise, sample_rate=0.02, steps=96, delta=1e-5, accountant="rdp"
    )
    assert 7.9 <= spent <= 8.0
    # More noise spends less; more steps spend more.
    assert (
        accounted_epsilon(
            noise_multiplier=2 * noise, sample_rate=0.02, steps=96, delta=1e-5, accountant="rdp"
        )
        < spent
        < accounted_epsilon(
            noise_multiplier=noise, sample_rate=0.02, steps=960, delta=1e-5, accountant="rdp"
        )
    )


def test_default_delta_stays_well_below_one_over_n() -> None:
    assert default_delta(100) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    with pytest.raises(ValueError):
        default_delta(0)


def test_a_package_with_a_consistent_guarantee_is_accepted(
    package: Path, base: BaseModelSpec
) -> None:
    result = validate_directory(package, base)
    guarantee = result.manifest.privacy
    assert guarantee is not None
    assert guarantee.steps == 11 and guarantee.sample_rate == 0.5
    assert 7.9 <= guarantee.epsilon <= 8.0
    assert guarantee.summary().startswith("ε = ")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p.update(epsilon=p["epsilon"] / 2), "epsilon >= "),
        (lambda p: p.update(noise_multiplier=p["noise_multiplier"] * 2, epsilon=1.0), "epsilon"),
        (lambda p: p.update(steps=5), "steps 11"),
        (lambda p: p.update(sample_rate=0.25), "sample_rate 0.5"),
    ],
    ids=["understated-epsilon", "noise-overstated", "steps", "sample-rate"],
)
def test_a_guarantee_that_does_not_add_up_is_refused(
    package: Path, base: BaseModelSpec, edit, expected: str
) -> None:
    edit_json(package / MANIFEST_FILE, lambda m: edit(m["privacy"]))
    error = rejection(package, base)
    assert (error.check, error.file) == ("privacy", MANIFEST_FILE), error.message
    assert error.expected is not None and expected in error.expected, error.message
    assert error.message.startswith(f"{MANIFEST_FILE}: privacy: ")


@pytest.mark.parametrize(
    "privacy",
    [
        {"epsilon": -1.0},
        {"epsilon": "NaN"},
        {"delta": 1.0},
        {"sample_rate": 0.0},
        {"mechanism": "laplace"},
        {"accountant": "moments"},
        {"format_version": 2},
        {"extra": 1},
        {"library": "opacus\n1.6"},
    ],
)
def test_a_malformed_guarantee_is_a_schema_error(
    package: Path, base: BaseModelSpec, privacy: dict
) -> None:
    edit_json(package / MANIFEST_FILE, lambda m: m["privacy"].update(privacy))
    error = rejection(package, base)
    assert error.check == "manifest_schema", error.message
    assert "privacy" in error.message


def test_a_guarantee_beside_average_activations_is_refused(
    tmp_path: Path, base: BaseModelSpec
) -> None:
    package = write_package(tmp_path / "expert", tiny_llama(), base, average_activation=True)
    guarantee = dp_guarantee(8, 8, 4, 11)
    edit_json(
        package / MANIFEST_FILE, lambda m: m.update(privacy=guarantee.model_dump(mode="json"))
    )
    error = rejection(package, base)
    assert error.check == "privacy"
    assert "has_average_activation" in error.message


def test_a_manifest_without_privacy_still_validates_and_says_none() -> None:
    manifest = ExpertManifest.model_validate(
        {
            "name": "alice/x",
            "base_model": {"name": "b", "fingerprint": "sha256:" + "0" * 64},
            "lora": {"r": 1, "lora_alpha": 1, "target_modules": ["q"], "modules": 1},
            "training": {"examples": 1, "steps": 1, "gate_steps": 0},
            "library_version": "0",
        }
    )
    assert manifest.privacy is None


def guarantee(epsilon: float, delta: float = 1e-5) -> PrivacyGuarantee:
    return PrivacyGuarantee(
        epsilon=epsilon,
        delta=delta,
        max_grad_norm=1,
        noise_multiplier=1,
        sample_rate=0.1,
        steps=10,
        library="opacus 1.6.0",
    )


def test_the_weakest_guarantee_is_the_largest_epsilon_and_delta() -> None:
    weakest = weakest_guarantee([guarantee(1.0, 1e-6), guarantee(8.0), guarantee(2.0)])
    assert (weakest.experts, weakest.without, weakest.epsilon, weakest.delta) == (3, 0, 8.0, 1e-5)
    assert "8.00" in weakest.summary()


def test_one_expert_without_dp_leaves_the_release_without_a_guarantee() -> None:
    weakest = weakest_guarantee([guarantee(1.0), None, None])
    assert (weakest.without, weakest.epsilon, weakest.delta) == (2, None, None)
    assert "2 of 3" in weakest.summary()
    empty = weakest_guarantee([])
    assert (empty.experts, empty.epsilon) == (0, None)
    assert not math.isnan(float(empty.experts))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.fixed_dictionaries(
        {},
        optional={
            "epsilon": st.one_of(st.floats(allow_nan=False), st.integers(-10, 10**9)),
            "delta": st.floats(allow_nan=False),
            "noise_multiplier": st.floats(allow_nan=False, allow_infinity=False),
            "sample_rate": st.floats(allow_nan=False),
            "max_grad_norm": st.floats(allow_nan=False, allow_infinity=False),
            "steps": st.integers(-1, 10**12),
        },
    )
)
def test_any_stated_guarantee_is_accepted_or_refused_cleanly(
    package: Path, base: BaseModelSpec, values: dict
) -> None:
    """Whatever a hostile manifest states, admission answers (accept or PackageRejected) and
    never lets the accountant crash or hang it."""
    edit_json(package / MANIFEST_FILE, lambda m: m["privacy"].update(values))
    try:
        result = validate_directory(package, base)
    except PackageRejected as error:
        assert error.check in ("privacy", "manifest_schema", "not_json"), error.message
    else:
        guarantee = result.manifest.privacy
        assert guarantee is not None
        spent = accounted_epsilon(
            noise_multiplier=guarantee.noise_multiplier,
            sample_rate=guarantee.sample_rate,
            steps=guarantee.steps,
            delta=guarantee.delta,
            accountant="rdp",
        )
        assert guarantee.epsilon >= spent * (1 - 1e-6)
