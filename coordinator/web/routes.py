"""HTML pages: the leaderboard at `/` (and `/ui/leaderboard`), the comparison of two releases
(`/ui/compare`), releases, release channels, the expert catalog, and their PNG plots. Routes
stay thin: `queries` reads, `analysis` computes, `plots` draws.

Pages follow the coordinator's read policy (`ReaderDep`): public unless `public_read` is off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from coordinator.channels import diff as channel_diffs
from coordinator.channels import service as channels
from coordinator.core.deps import BlobsDep, SessionDep, SettingsDep, require_reader
from coordinator.core.errors import NotFound
from coordinator.core.params import Offset, RowFilter, RowNumber
from coordinator.credit import service as credit
from coordinator.credit.schemas import ReleaseCredit
from coordinator.evaluations.models import EvaluationResult
from coordinator.evaluations.public_errors import redact
from coordinator.evaluations.service import InvalidLeaveOut
from coordinator.experts import diff as expert_diff
from coordinator.experts import service as experts
from coordinator.leaderboard import comparisons
from coordinator.leaderboard import service as leaderboard
from coordinator.leaderboard.schemas import PairedDelta
from coordinator.releases import service as releases
from coordinator.releases.models import Release
from coordinator.releases.schemas import method_settings
from coordinator.web import analysis, plots, queries
from coordinator.web.queries import MAX_PAGE_SIZE, PAGE_SIZE, CatalogStatus, Split
from protocol.methods import METHOD_SPECS

HERE = Path(__file__).parent
STATIC_FILES = {"site.css": "text/css", "site.js": "text/javascript"}
# Results are immutable: their plots can be cached as long as the browser likes (and by
# shared caches only when reads are public). The methods plot changes with new results:
# the browser asks again, and gets a 304 by ETag.
_IMMUTABLE = "max-age=86400"
_REVALIDATE = "no-cache"


router = APIRouter(include_in_schema=False, dependencies=[Depends(require_reader)])
templates = Jinja2Templates(directory=HERE / "templates")

# Bounded like the API's: an offset or number past the database's integers is a 422, not a
# 500 (coordinator.core.params).
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]


def _query_url(request: Request, **changes: Any) -> str:
    """The current URL with some query parameters changed (None removes one); changing
    anything but the offset goes back to the first page."""
    params = dict(request.query_params)
    if "offset" not in changes:
        params.pop("offset", None)
    for key, value in changes.items():
        if value is None or value == "":
            params.pop(key, None)
        else:
            params[key] = str(value)
    return f"{request.url.path}?{urlencode(params)}" if params else request.url.path


def _accuracy(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _date(value: datetime | None) -> str:
    return "–" if value is None else value.strftime("%Y-%m-%d")


def _kl(value: float | None) -> str:
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def _interval(delta: PairedDelta) -> str:
    return f"[{delta.low:+.3f}, {delta.high:+.3f}]"


def _p_value(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


templates.env.globals["query_url"] = _query_url
templates.env.globals["confidence"] = comparisons.CONFIDENCE
templates.env.globals["resamples"] = comparisons.RESAMPLES
templates.env.filters["signed"] = _signed
templates.env.filters["interval"] = _interval
templates.env.filters["p_value"] = _p_value
# A difference of accuracies in percentage points: 0.042 -> +4.2 (credit on expert pages).
templates.env.filters["points"] = lambda value: f"{100 * value:+.1f}"
templates.env.filters["accuracy"] = _accuracy
templates.env.filters["date"] = _date
templates.env.filters["kl"] = _kl
templates.env.filters["log"] = math.log
templates.env.filters["group_label"] = queries.group_label
# A release's method with k and its parameters (`ties, density 0.2, scale 1`), and its
# parameters alone.
templates.env.filters["method_label"] = queries.release_method_label
templates.env.filters["params_text"] = lambda params: method_settings(None, params or {})
# Job errors stored before errors were redacted at the source may name worker paths/hosts.
templates.env.filters["redact"] = redact


def _blank(value: str | None) -> str | None:
    return value or None


def _render(
    request: Request, template: str, status_code: int = 200, **context: Any
) -> HTMLResponse:
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def _not_found(request: Request, message: str) -> HTMLResponse:
    return _render(request, "not_found.html", status_code=404, message=message)


@router.get("/ui/static/{name}")
def static_file(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise NotFound(f"no static file {name!r}")
    return FileResponse(HERE / "static" / name, media_type=STATIC_FILES[name])


# --- leaderboard -------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
@router.get("/ui/leaderboard", response_class=HTMLResponse)
def leaderboard_page(
    request: Request,
    session: SessionDep,
    base_model: str | None = None,
    method: str | None = None,
    split: Split = Split.ALL,
    sort: str = "mean",
    order: Literal["asc", "desc"] = "desc",
    limit: Limit = PAGE_SIZE,
    offset: Offset = 0,
) -> HTMLResponse:
    board = queries.board(
        session,
        base_model=_blank(base_model),
        method=_blank(method),
        split=split,
        sort=sort,
        descending=order == "desc",
        limit=limit,
        offset=offset,
    )
    plot_query = urlencode(
        {k: v for k, v in (("base_model", base_model), ("split", split.value)) if v}
    )
    return _render(
        request,
        "leaderboard.html",
        nav="leaderboard",
        board=board,
        base_model=base_model or "",
        method=method or "",
        split=split.value,
        splits=[
            (s.value, "all tasks" if s == Split.ALL else queries.group_label(s.value))
            for s in Split
        ],
        order=order,
        plot_url=f"/ui/leaderboard/methods.png?{plot_query}",
    )


def _png_response(
    request: Request, digest: str, render: Callable[[], bytes], cache_control: str
) -> Response:
    """A plot from `plots.PNG_CACHE` (rendered on a miss), or a 304 when the browser has it."""
    etag = f'"{digest}"'
    audience = "public" if request.app.state.settings.public_read else "private"
    headers = {"ETag": etag, "Cache-Control": f"{audience}, {cache_control}"}
    presented = request.headers.get("if-none-match", "")
    if etag in (tag.strip().removeprefix("W/") for tag in presented.split(",")):
        return Response(status_code=304, headers=headers)
    image = plots.PNG_CACHE.get_or_render(digest, render)
    return Response(image.png, media_type="image/png", headers=headers)


@router.get("/ui/leaderboard/methods.png")
def methods_plot(
    request: Request, session: SessionDep, base_model: str | None = None, split: Split = Split.ALL
) -> Response:
    means = queries.method_means(session, base_model=_blank(base_model), split=split)
    scope = "all" if split == Split.ALL else queries.group_label(split.value)
    title = f"Best release of each method, {scope} tasks"
    if base_model:
        title += f" ({base_model})"
    # Without results the plot shows no title: one image for every filter that finds none,
    # so made-up filter values cannot make a new render each.
    digest = plots.plot_digest("methods", title if means else "", means)
    return _png_response(request, digest, lambda: plots.method_bars(means, title), _REVALIDATE)


# --- releases ----------------------------------------------------------------------------


@router.get("/ui/releases", response_class=HTMLResponse)
def releases_page(
    request: Request,
    session: SessionDep,
    base_model: str | None = None,
    method: str | None = None,
    limit: Limit = PAGE_SIZE,
    offset: Offset = 0,
) -> HTMLResponse:
    page = queries.list_releases(
        session, base_model=_blank(base_model), method=_blank(method), limit=limit, offset=offset
    )
    return _render(
        request,
        "releases.html",
        nav="releases",
        page=page,
        privacy=releases.release_privacy(session, [item.release.id for item in page.items]),
        base_model=base_model or "",
        method=method or "",
        base_models=queries.base_model_names(session),
        methods=queries.release_methods(session),
    )


@dataclass(frozen=True)
class TaskAnalysis:
    """One evaluated task on a release page: its score, heatmap and Oracle divergence."""

    result: EvaluationResult
    has_routing: bool
    divergence: analysis.OracleDivergence
    oracle: queries.OracleChoice | None
    most_chosen: list[tuple[str, float]]


def _task_analysis(
    result: EvaluationResult,
    versions: list[Any],
    oracle: queries.OracleChoice | None,
) -> TaskAnalysis:
    stats = result.routing_stats
    has_routing = bool(stats)
    most_chosen: list[tuple[str, float]] = []
    if stats:
        try:
            routing = analysis.per_layer_routing(stats)
            shares = analysis.routing_distribution(routing)
            most_chosen = sorted(zip(routing.experts, shares, strict=True), key=lambda p: -p[1])[:3]
        except analysis.UnreadableStats:
            has_routing = False
    divergence = analysis.oracle_divergence(
        stats if has_routing else None, versions, oracle.version if oracle else None
    )
    return TaskAnalysis(result, has_routing, divergence, oracle, most_chosen)


def _release_credit(
    session: SessionDep, release: Release, groups: dict[str, str]
) -> ReleaseCredit | None:
    """The release's "Contributions" (leave-one-out credit); None when no expert can be
    left out of it (base, single, a single expert)."""
    try:
        credit.check_creditable(release)
    except InvalidLeaveOut:
        return None
    return credit.release_credit(session, release, groups=groups)


@router.get("/ui/releases/{number}", response_class=HTMLResponse)
def release_page(request: Request, session: SessionDep, number: RowNumber) -> HTMLResponse:
    try:
        release = releases.get_release(session, number)
    except NotFound:
        return _not_found(request, f"There is no release #{number}.")
    versions = releases.release_versions(session, release)
    results = queries.release_results(session, release)
    oracles = queries.oracle_choices(session, versions, [r.task for r in results])
    tasks = [_task_analysis(r, versions, oracles.get(r.task)) for r in results]
    mean = leaderboard.mean_accuracy([r.accuracy for r in results])
    base = queries.base_model_of(session, release)
    groups = leaderboard.task_groups(session)
    return _render(
        request,
        "release.html",
        nav="releases",
        release=release,
        label=queries.release_label(release),
        base_model=base.name if base else "?",
        versions=versions,
        privacy=releases.release_privacy(session, [release.id])[release.id],
        tasks=tasks,
        mean=mean,
        jobs=queries.release_jobs(session, release),
        groups=groups,
        vs_base=comparisons.versus_base(session, [release], groups=groups)[release.id],
        credit=_release_credit(session, release, groups),
        channel_diff=channel_diffs.release_channel_diff(session, release, groups=groups),
    )


@router.get("/ui/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    session: SessionDep,
    a: RowFilter = None,
    b: RowFilter = None,
    a_job: RowFilter = None,
    b_job: RowFilter = None,
    examples_per_task: Annotated[int | None, Query(ge=1)] = None,
    seed: int | None = None,
) -> HTMLResponse:
    """Release a against release b on the same examples (`comparisons.compare`, the JSON of
    `GET /leaderboard/compare`); without both, only the form."""
    comparison, error, status = None, None, 200
    if a is not None and b is not None:
        try:
            comparison = comparisons.compare(
                session,
                a,
                b,
                groups=leaderboard.task_groups(session),
                a_job=a_job,
                b_job=b_job,
                examples_per_task=examples_per_task,
                seed=seed,
            )
        except NotFound as missing:
            return _not_found(request, missing.message)
        except comparisons.ComparisonRejected as rejected:
            error, status = rejected.message, 422
    return _render(
        request,
        "compare.html",
        status_code=status,
        nav="leaderboard",
        comparison=comparison,
        error=error,
        a=a,
        b=b,
    )


@router.get("/ui/results/{result_id}/routing.png")
def routing_plot(request: Request, session: SessionDep, result_id: RowNumber) -> Response:
    result = queries.result_by_id(session, result_id)
    if result is None:
        raise NotFound(f"no evaluation result {result_id}")
    if not result.routing_stats:
        raise NotFound(f"evaluation result {result_id} ({result.task}) has no routing statistics")
    try:
        routing = analysis.per_layer_routing(result.routing_stats)
    except analysis.UnreadableStats as error:
        raise NotFound(str(error)) from error
    release = session.get(Release, result.release_id)
    label = queries.release_label(release) if release else f"release {result.release_id}"
    title = f"{label} on {result.task}\nexperts chosen per layer"
    digest = plots.plot_digest("routing", title, routing)
    return _png_response(request, digest, lambda: plots.routing_heatmap(routing, title), _IMMUTABLE)


# --- catalog -----------------------------------------------------------------------------


@router.get("/ui/experts", response_class=HTMLResponse)
def experts_page(
    request: Request,
    session: SessionDep,
    q: str | None = None,
    namespace: str | None = None,
    base_model: str | None = None,
    status: CatalogStatus = CatalogStatus.ALL,
    limit: Limit = PAGE_SIZE,
    offset: Offset = 0,
) -> HTMLResponse:
    page = queries.search_experts(
        session,
        text=_blank(q),
        namespace=_blank(namespace),
        base_model=_blank(base_model),
        status=status,
        limit=limit,
        offset=offset,
    )
    return _render(
        request,
        "experts.html",
        nav="experts",
        page=page,
        q=q or "",
        namespace=namespace or "",
        base_model=base_model or "",
        status=status.value,
        statuses=[s.value for s in CatalogStatus],
    )


@router.get("/ui/experts/{namespace}/{name}", response_class=HTMLResponse)
def expert_page(
    request: Request,
    session: SessionDep,
    namespace: str,
    name: str,
    limit: Limit = PAGE_SIZE,
    offset: Offset = 0,
) -> HTMLResponse:
    try:
        expert = experts.get_expert(session, namespace, name)
    except NotFound as error:
        return _not_found(request, error.message)
    page = queries.expert_versions(session, expert, limit=limit, offset=offset)
    return _render(
        request,
        "expert.html",
        nav="experts",
        expert=expert,
        page=page,
        versions=page.items,
        releases=releases.releases_containing(session, expert),
        credit_lines=credit.expert_credit_lines(session, expert),
    )


# The diff of two versions (coordinator.experts.diff; the JSON of `GET .../diff`).
DiffAgainst = Annotated[str | None, Query(max_length=expert_diff.MAX_REF_CHARS)]


def _diff_plot_url(namespace: str, name: str, version: int, against: str | None) -> str:
    query = f"?{urlencode({'against': against})}" if against else ""
    return f"/ui/experts/{quote(namespace)}/{quote(name)}/{version}/diff.png{query}"


@router.get("/ui/experts/{namespace}/{name}/{version}/diff", response_class=HTMLResponse)
def expert_diff_page(
    request: Request,
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    namespace: str,
    name: str,
    version: RowNumber,
    against: DiffAgainst = None,
) -> HTMLResponse:
    """What changed from `against` (default: the previous version) to this version."""
    against = _blank(against)
    context: dict[str, Any] = {"nav": "experts", "namespace": namespace, "name": name}
    try:
        pair = expert_diff.resolve_pair(session, namespace, name, version, against)
        context.update(a=pair.a, b=pair.b)
        stored_a, stored_b = pair.stored(session)
        session.commit()  # end the read transaction: the diff reads whole packages
        diff = expert_diff.diff_stored(blobs, settings, stored_a, stored_b)
    except NotFound as error:
        return _not_found(request, error.message)
    except (expert_diff.InvalidRef, expert_diff.DiffRefused) as error:
        return _render(request, "expert_diff.html", status_code=422, error=error.message, **context)
    plot_url = _diff_plot_url(namespace, name, version, against)
    return _render(request, "expert_diff.html", diff=diff, plot_url=plot_url, **context)


@router.get("/ui/experts/{namespace}/{name}/{version}/diff.png")
def expert_diff_plot(
    request: Request,
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    namespace: str,
    name: str,
    version: RowNumber,
    against: DiffAgainst = None,
) -> Response:
    pair = expert_diff.resolve_pair(session, namespace, name, version, _blank(against))
    stored_a, stored_b = pair.stored(session)
    title = f"{pair.b.ref} against {pair.a.ref}: change per layer"
    session.commit()
    # Versions never change: the two package digests fix the image.
    digest = plots.plot_digest("diff", title, stored_a.package_digest, stored_b.package_digest)

    def render() -> bytes:
        return plots.diff_by_layer(
            expert_diff.diff_stored(blobs, settings, stored_a, stored_b), title
        )

    return _png_response(request, digest, render, _IMMUTABLE)


# --- release channels --------------------------------------------------------------------


@router.get("/ui/channels", response_class=HTMLResponse)
def channels_page(
    request: Request, session: SessionDep, limit: Limit = PAGE_SIZE, offset: Offset = 0
) -> HTMLResponse:
    page = channels.channel_page(session, limit=limit, offset=offset)
    return _render(request, "channels.html", nav="channels", page=page, limit=limit, offset=offset)


def _channel_plot_url(namespace: str, name: str) -> str:
    return f"/ui/channels/{quote(namespace)}/{quote(name)}/means.png"


@router.get("/ui/channels/{namespace}/{name}", response_class=HTMLResponse)
def channel_page(
    request: Request,
    session: SessionDep,
    namespace: str,
    name: str,
    limit: Limit = PAGE_SIZE,
    offset: Offset = 0,
) -> HTMLResponse:
    """A channel's settings, its history (newest first) and the chart of its releases'
    held-in and held-out means."""
    try:
        channel = channels.get_channel(session, namespace, name)
    except NotFound as error:
        return _not_found(request, error.message)
    groups = leaderboard.task_groups(session)
    return _render(
        request,
        "channel.html",
        nav="channels",
        channel=channel,
        history=channels.history_page(session, channel, limit=limit, offset=offset),
        points=channel_diffs.channel_means(session, channel, groups=groups),
        takes_top_k=METHOD_SPECS[channel.method].takes_top_k,  # type: ignore[index]
        limit=limit,
        offset=offset,
        plot_url=_channel_plot_url(namespace, name),
    )


@router.get("/ui/channels/{namespace}/{name}/means.png")
def channel_plot(request: Request, session: SessionDep, namespace: str, name: str) -> Response:
    channel = channels.get_channel(session, namespace, name)
    groups = leaderboard.task_groups(session)
    points = channel_diffs.channel_means(session, channel, groups=groups)
    title = f"Channel {channel.full_name}: mean accuracy of its releases"
    digest = plots.plot_digest("channel", title, points)
    return _png_response(request, digest, lambda: plots.channel_means(points, title), _REVALIDATE)
