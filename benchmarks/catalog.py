"""The zero-shot benchmark's expert cache is a coordinator catalog, and its results go to
that catalog's leaderboard.

`BenchmarkCatalog` opens a coordinator data directory (SQLite + blobs, created and
migrated if missing) or a shared database, and works through the coordinator's own
services: experts enter through `register_expert_package` (the validation path of an HTTP
upload), releases through `create_release`, results through the evaluations service.

An expert is found again by its name (`expert_name(task)`) in the `bench` namespace and the
benchmark's cache key, which the manifest carries in its free-form `description` as
`[cache key <16 hex>]` (the manifest has no other free-form field, and the protocol stays
as it is).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session
from transformers import PreTrainedModel

import phatgoose
from coordinator.auth import service as auth
from coordinator.auth.models import Role, Token
from coordinator.base_models.service import register_base_model
from coordinator.core.app import open_database
from coordinator.core.config import Settings
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.outcomes import MAX_OUTCOME_EXAMPLES, ExampleOutcomes
from coordinator.evaluations.schemas import EvaluationCreate, TaskGroups
from coordinator.experts import service as experts_service
from coordinator.experts.files import copy_version_files
from coordinator.experts.models import Channel, ExpertVersion
from coordinator.leaderboard.schemas import Leaderboard
from coordinator.leaderboard.service import leaderboard
from coordinator.releases import service as releases
from coordinator.releases.schemas import ReleaseCreate
from coordinator.storage import BlobStore, open_blob_store
from phatgoose.expert import Expert
from phatgoose.models import base_model_spec, cache_root
from protocol import METHOD_SPECS, PACKAGE_FILES, ParamValue, RoutingMethod, is_method
from protocol.methods import resolve_params

NAMESPACE = "bench"
SOURCE = "phatgoose bench zero-shot"
_KEY_MARK = re.compile(r"\s*\[cache key ([0-9a-f]{16})\]$")


def default_catalog_dir() -> Path:
    return cache_root() / "benchmark-catalog"


def with_cache_key(expert: Expert, key: str) -> Expert:
    """The expert with `[cache key <key>]` ending its manifest's description."""
    description = _KEY_MARK.sub("", expert.manifest.description)
    manifest = expert.manifest.model_copy(
        update={"description": f"{description} [cache key {key}]".strip()}
    )
    return dataclasses.replace(expert, manifest=manifest)


def cache_key_of(manifest: Mapping[str, Any]) -> str | None:
    found = _KEY_MARK.search(str(manifest.get("description", "")))
    return found.group(1) if found else None


class BenchmarkCatalog:
    """A coordinator catalog used as the benchmark's expert cache and leaderboard.

    `data_dir` holds the blobs (and the SQLite file unless `database_url` names a shared
    database). Experts are published by a maintainer token named after `namespace`
    (created once), so bare expert names land in that namespace.
    """

    def __init__(
        self, data_dir: Path, *, database_url: str | None = None, namespace: str = NAMESPACE
    ) -> None:
        options: dict[str, Any] = {"data_dir": Path(data_dir).expanduser()}
        if database_url:
            options["database_url"] = database_url
        self.settings = Settings(**options)
        self.data_dir = self.settings.data_dir
        self.namespace = namespace
        self.engine, self.sessions = open_database(self.settings)
        self.blobs = open_blob_store(self.settings)
        self._token: Token | None = None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> BenchmarkCatalog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    @property
    def token(self) -> Token:
        """The benchmark's maintainer token (its secret is never needed)."""
        if self._token is None:
            with self.session() as session:
                for token in auth.list_tokens(session):
                    if (
                        token.name == self.namespace
                        and token.revoked_at is None
                        and token.is_maintainer
                    ):
                        self._token = token
                        break
                else:
                    self._token = auth.create_token(
                        session, name=self.namespace, role=Role.MAINTAINER
                    ).token
        return self._token

    # ----------------------------------------------------------------- experts
    def ensure_base_model(self, model: PreTrainedModel, name: str) -> None:
        """Register the base model (a no-op when this exact model is registered)."""
        with self.session() as session:
            register_base_model(session, base_model_spec(model, name))

    def find(self, name: str, key: str, fingerprint: str) -> str | None:
        """The newest active version of `namespace/name` with this cache key and base
        weights, as `namespace/name@version`; None if there is none."""
        with self.session() as session:
            page = experts_service.list_versions(
                session, namespace=self.namespace, name=name, limit=10_000
            )
            matches = [
                v
                for v in page.items
                if cache_key_of(v.manifest) == key
                and v.manifest.get("base_model", {}).get("fingerprint") == fingerprint
            ]
            return max(matches, key=lambda v: v.number).ref if matches else None

    def load(self, ref: str) -> Expert:
        """The expert `ref` read from the blob store."""
        with (
            tempfile.TemporaryDirectory(prefix="bench-expert-") as tmp,
            self.session() as session,
        ):
            version = experts_service.resolve_ref(session, ref)
            return Expert.load(copy_version_files(session, self.blobs, version.files, Path(tmp)))

    def register(self, expert: Expert, key: str) -> str:
        """Register `expert` (tagged with `key`) through the upload's validation path;
        returns its ref. Content already in the catalog returns the existing version."""
        tagged = with_cache_key(expert, key)
        with tempfile.TemporaryDirectory(prefix="bench-upload-", dir=self._tmp_dir()) as tmp:
            tagged.save(tmp)
            files = {
                name: Path(tmp) / name for name in PACKAGE_FILES if (Path(tmp) / name).is_file()
            }
            with self.session() as session:
                try:
                    version: ExpertVersion = experts_service.register_expert_package(
                        session,
                        self.blobs,
                        self.settings,
                        files=files,
                        uploader=self.token,
                        channel=Channel.HTTP,
                    )
                except experts_service.DuplicatePackage as duplicate:
                    return duplicate.existing.ref
                return version.ref

    def _tmp_dir(self) -> Path:
        self.settings.upload_tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.settings.upload_tmp_dir

    # -------------------------------------------------------------- leaderboard
    def leaderboard(self) -> Leaderboard:
        with self.session() as session:
            return leaderboard(session)

    def serve_hint(self) -> str:
        # The URL may hold a password: name the option, not its value.
        url = " --database-url <the same URL>" if self.settings.database_url else ""
        return (
            f"leaderboard: run `phatgoose coordinator serve --data-dir {self.data_dir}{url}` "
            "and open http://127.0.0.1:8765/ui/leaderboard"
        )


# ---------------------------------------------------------------------- publishing
def evaluator_version(record: Mapping[str, Any]) -> str:
    """The library version and the benchmark's scoring window (fits the 64-char column)."""
    length = record["config"].get("eval_max_length") or record["config"]["max_length"]
    return f"{phatgoose.__version__}+zero-shot-L{length}"[:64]


def _release_number(
    session: Session,
    blobs: BlobStore,
    token: Token,
    *,
    method: RoutingMethod,
    base_model: str,
    experts: Sequence[str],
    top_k: int | None,
    expert: str | None,
    params: Mapping[str, ParamValue] | None = None,
) -> int:
    """An identical release (method, base model, experts, k, parameters, single expert),
    else a new one. Parameters not given are the method's defaults."""
    resolved = resolve_params(method, params)
    for release in releases.list_releases(session, base_model=base_model, method=method):
        manifest = release.manifest
        if (
            sorted(e["ref"] for e in manifest["experts"]) == sorted(experts)
            and release.top_k == top_k
            and _same_params(release.method_params or {}, resolved)
            # a release records its single expert by name; the version is in `experts`
            and manifest.get("expert") == (expert.split("@")[0] if expert else None)
        ):
            return release.number
    request = ReleaseCreate(
        method=method,
        experts=list(experts),
        top_k=top_k,
        params=dict(params or {}),
        expert=expert,
        base_model=base_model,
        notes=f"published by `{SOURCE}`",
    )
    return releases.create_release(session, blobs, request, by=token).number


def _same_params(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    """Equal as JSON values (an integer is not the float of the same value)."""
    return dict(a) == dict(b) and all(type(a[name]) is type(b[name]) for name in a)


def _job_id(
    session: Session,
    token: Token,
    request: EvaluationCreate,
    scores: Sequence[evaluations.TaskScore],
    source: Mapping[str, Any],
) -> tuple[int, bool]:
    """A finished job of the release with this spec, these scores and these per-example
    outcomes, else a new imported one: (job id, created). A job stored without outcomes
    (or with others) is not these results: publishing them again imports a new job, which
    the leaderboard's paired comparisons then use (the newest evaluation of a spec)."""
    wanted = {
        **request.model_dump(mode="json", exclude={"release"}, exclude_none=True),
        "source": dict(source),
    }
    ours = {
        s.task: (
            s.accuracy,
            s.stderr,
            s.n,
            s.evaluator_version,
            None if s.outcomes is None else s.outcomes.to_json(),
        )
        for s in scores
    }
    release = releases.get_release(session, request.release)
    for job in evaluations.list_jobs_of_release(session, release.id):
        spec = {k: v for k, v in job.spec.items() if k != "requested_by"}
        if job.state != "done" or spec != wanted:
            continue
        theirs = {
            r.task: (r.accuracy, r.stderr, r.n, r.evaluator_version, r.outcomes)
            for r in evaluations.job_results(session, job.id)
        }
        if theirs == ours:
            return job.id, False
    job = evaluations.import_job(session, request, scores, by=token, source=source)
    return job.id, True


def result_outcomes(
    result: Mapping[str, Any], choices: Sequence[int] | None = None
) -> ExampleOutcomes | None:
    """One method's per-example outcomes on a task as the record keeps them
    (`phatgoose.evaluation.TaskResult.to_dict`: `predictions`, `correct`), with `choices`,
    each scored example's number of answer choices, when the record lists them. None for a
    result recorded before outcomes were kept, or over more examples than the coordinator
    keeps (`MAX_OUTCOME_EXAMPLES`, the worker's rule). The coordinator checks the rest
    (`check_outcomes`: lengths, indices, the count against the accuracy)."""
    correct = result.get("correct") or []
    if not correct or result["n"] > MAX_OUTCOME_EXAMPLES:
        return None
    return ExampleOutcomes(
        predictions=tuple(result.get("predictions") or ()),
        correct=tuple(correct),
        choices=None if choices is None else tuple(choices),
    )


# (method, experts, top_k, single expert, params) of a release to publish.
_ReleasePlan = tuple[RoutingMethod, list[str], int | None, str | None, dict[str, ParamValue]]


def publish(catalog: BenchmarkCatalog, record: Mapping[str, Any]) -> dict[str, Any]:
    """Releases for the run's methods and their results as finished evaluation jobs.

    Routing methods become releases over every expert of the run (none for base; k = the
    run's top-k for the per-token routers; the method's hyper-parameters as its summary's
    `params` records them, else its defaults); best_individual and multitask become `single`
    releases over their expert. Oracle uses a different expert per task, so it is no
    release and is skipped. Identical releases and jobs are reused, so publishing twice adds
    nothing.

    Each result carries its per-example outcomes (`result_outcomes`; each example's number
    of choices from `record["tasks"][task]["choices"]` when the record lists them), from
    which the leaderboard computes every release's paired difference against the base
    (`vs_base`). Tasks published without outcomes are listed per method under
    `without_outcomes`.
    """
    config = record["config"]
    base_model = config["base_model"]
    task_info = record["tasks"]
    refs = {e["name"]: e.get("ref") for e in record.get("experts", [])}
    version = evaluator_version(record)
    source = {
        "benchmark": "zero-shot",
        "command": SOURCE,
        "n_eval": config["n_eval"],
        "eval_limit": config.get("eval_limit"),
        "eval_max_length": config.get("eval_max_length") or config["max_length"],
        "scoring": "rank classification (phatgoose.evaluation.evaluate_task)",
    }  # no date: the same results published again must match the job already there
    if "n_eval_held_out" in config:
        # Held-out tasks score up to this many examples, not `examples_per_task`; records
        # from before it existed publish the source they always did (and match their jobs).
        source["n_eval_held_out"] = config["n_eval_held_out"]
    published: dict[str, Any] = {
        "catalog": str(catalog.data_dir),
        "releases": {},
        "jobs": {},
        "skipped": {},
        "without_outcomes": {},
    }

    def target(method: str, summary: Mapping[str, Any]) -> _ReleasePlan | str:
        """(method, experts, top_k, single expert, params) of the release, or why there is
        none."""
        if method == "oracle":
            return "a different expert per task (selected on the evaluation labels): no release"
        if is_method(method) and not METHOD_SPECS[method].single_expert:
            spec = METHOD_SPECS[method]
            params = dict(summary.get("params") or {})
            if not spec.takes_experts:
                return method, [], None, None, params
            missing = [name for name, ref in refs.items() if ref is None]
            if missing or not refs:
                return f"experts not in the catalog: {missing}"
            top_k = config["top_k"] if spec.takes_top_k else None
            return method, sorted(r for r in refs.values() if r), top_k, None, params
        if method == "best_individual":
            ref = refs.get(record["methods"][method]["choice"])
        elif method == "multitask":
            ref = record.get("multitask", {}).get("ref")
        else:
            return f"unknown method {method!r}"
        if ref is None:
            return "its expert is not in the catalog"
        return "single", [ref], None, ref, {}

    with catalog.session() as session:
        for method, summary in record.get("methods", {}).items():
            plan = target(method, summary)
            if isinstance(plan, str):
                published["skipped"][method] = plan
                continue
            release_method, experts, top_k, expert, params = plan
            number = _release_number(
                session,
                catalog.blobs,
                catalog.token,
                method=release_method,
                base_model=base_model,
                experts=experts,
                top_k=top_k,
                expert=expert,
                params=params,
            )
            results = summary["tasks"]
            tasks = [t for t in task_info if t in results]
            request = EvaluationCreate(
                release=number,
                tasks=tasks,
                examples_per_task=config.get("eval_limit") or config["n_eval"],
                seed=config["split_seed"],
                task_groups=TaskGroups(
                    held_in=[t for t in tasks if task_info[t]["held_in"]],
                    held_out=[t for t in tasks if not task_info[t]["held_in"]],
                ),
            )
            scores = [
                evaluations.TaskScore(
                    task=t,
                    accuracy=results[t]["accuracy"],
                    stderr=results[t]["stderr"],
                    n=results[t]["n"],
                    evaluator_version=version,
                    seconds=results[t]["seconds"],
                    routing_stats=None,
                    # Results cached before precision was recorded were all float32.
                    precision=results[t].get("precision", "float32"),
                    outcomes=result_outcomes(results[t], task_info[t].get("choices")),
                )
                for t in tasks
            ]
            without = [s.task for s in scores if s.outcomes is None]
            if without:
                published["without_outcomes"][method] = without
            job, _created = _job_id(session, catalog.token, request, scores, source)
            published["releases"][method] = number
            published["jobs"][method] = job
    return published
