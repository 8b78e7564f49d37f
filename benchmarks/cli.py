"""`phatgoose bench`: the benchmarks' command line (mounted by the root CLI)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypedDict

import torch
import typer

from phatgoose.models import cache_root
from protocol.precision import Precision

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from benchmarks.catalog import BenchmarkCatalog
    from benchmarks.zero_shot import ZeroShotConfig

app = typer.Typer(
    help=(
        "Benchmarks. `zero-shot`: train one expert per held-in BIG-bench task and score every "
        "routing method on held-out and held-in tasks (BENCHMARK.md). `zero-shot-scaling`: "
        "the held-out mean over pools of 2, 4, 8 and all of those experts. `routing-cost`: "
        "forward latency, throughput and memory of routed models against the base model."
    ),
    no_args_is_help=True,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _task_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    from phatgoose.bigbench import load_task_list

    return load_task_list(value)


@app.command("zero-shot")
def zero_shot(
    preset: Annotated[
        str | None,
        typer.Option(
            help="Preset: 'cpu' (BENCHMARK.md's whole suite at its reference training "
            "settings, every method; about 8 h on 2 idle cores, resumable), 'cpu-4' (the "
            "4-expert, 6-task cpu preset of the committed zero-shot-cpu* results; ~1 h), "
            "'cpu-small' (a busy 2-core machine), 'paper' (every expert, r=16; a GPU machine), "
            "'smoke' (minutes; checks the pipeline only)."
        ),
    ] = "cpu",
    config: Annotated[
        Path | None,
        typer.Option(help="A JSON or TOML file of settings; overrides the preset."),
    ] = None,
    held_in: Annotated[
        str | None,
        typer.Option(help="Held-in tasks (one expert each): 'a,b,c' or a file, one per line."),
    ] = None,
    held_out: Annotated[
        str | None, typer.Option(help="Held-out tasks (no expert): 'a,b,c' or a file.")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Methods, comma-separated, from: base, phatgoose, merged, arrow, spectr, "
            "phatgoose_example, smear, ties, dare, average_activation, retrieval, oracle, "
            "best_individual, multitask (default: all; spectr's settings chosen on the "
            "held-in tasks, ties and dare at their defaults)."
        ),
    ] = None,
    n_eval: Annotated[
        int | None,
        typer.Option(help="Evaluation split size per held-in task (the rest is training)."),
    ] = None,
    n_eval_held_out: Annotated[
        int | None,
        typer.Option(
            help="Examples scored per held-out task (all of a smaller task), the first of "
            "the seeded shuffle; experts are unaffected."
        ),
    ] = None,
    single_experts_on_held_out: Annotated[
        bool | None,
        typer.Option(
            "--single-experts-on-held-out/--single-experts-on-held-in-only",
            help="Score every single expert on the held-out tasks too (oracle and "
            "best_individual there; the preset's default), or on the held-in tasks only.",
            show_default=False,
        ),
    ] = None,
    single_experts: Annotated[
        str | None,
        typer.Option(
            help="Score only these held-in tasks' experts alone, 'a,b' (how --jobs splits "
            "that work; oracle and best_individual are left out of such a run).",
            show_default=False,
        ),
    ] = None,
    eval_limit: Annotated[
        int | None,
        typer.Option(
            help="Score only the first N examples of each evaluation split "
            "(keeps the split, so cached experts stay valid)."
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="LoRA steps per expert.")] = None,
    gate_steps: Annotated[int | None, typer.Option(help="Gate steps per expert.")] = None,
    multitask_steps: Annotated[
        int | None,
        typer.Option(
            help="Multitask LoRA steps (default: the experts' total sequences over "
            "--multitask-batch-size)."
        ),
    ] = None,
    multitask_batch_size: Annotated[
        int | None, typer.Option(help="Multitask LoRA batch size (default: the experts').")
    ] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per training sequence.")] = None,
    r: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Experts per token (token routers).")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model name or path.")] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Directory of cached evaluation results, and of expert packages from "
            "before the catalog (read and registered into the catalog when found). "
            "Default: <phatgoose cache>/benchmark-experts."
        ),
    ] = None,
    catalog: Annotated[
        Path | None,
        typer.Option(
            "--catalog",
            help="The expert cache: a coordinator data directory (SQLite + blobs; created "
            "and migrated if missing). Experts are looked up there by name (namespace "
            "'bench') and cache key before training, and registered there once trained. "
            "Default: <phatgoose cache>/benchmark-catalog (~/.cache/phatgoose/"
            "benchmark-catalog unless PHATGOOSE_CACHE moves it).",
            show_default=False,
        ),
    ] = None,
    catalog_database_url: Annotated[
        str | None,
        typer.Option(
            "--catalog-database-url",
            help="A shared coordinator database (SQLAlchemy URL) for the catalog; the blobs "
            "stay in --catalog. Default: the SQLite file in --catalog.",
            show_default=False,
        ),
    ] = None,
    publish: Annotated[
        bool,
        typer.Option(
            "--publish/--no-publish",
            help="After the run (--cached-only too), put the results on the catalog's "
            "leaderboard: a release per method (oracle excluded: it is no release) with "
            "its results as a finished evaluation job; identical ones are reused.",
        ),
    ] = True,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Result JSON (default benchmarks/results/zero-shot-<preset>.json); "
            "a .md table and a .png plot are written beside it."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch CPU threads (per process with --jobs; default there: the cores "
            "shared evenly by the processes running at once)."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Where to train and score: auto (a CUDA GPU if there is one), cpu, cuda, "
            "cuda:N. On CUDA, float32 products use TF32."
        ),
    ] = "auto",
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="Compute precision of training and scoring: auto (bfloat16 where the device "
            "multiplies it natively), float32, bfloat16. Default: the preset's (auto). "
            "Experts and scores are cached per precision.",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            help="Processes at a time: the experts train in parallel (several per process "
            "when there are more experts), then the multitask LoRA alone, then the methods "
            "score in parallel, then this process assembles and publishes. One process "
            "leaves a GPU mostly idle with a small model; on a 2-core CPU keep 1.",
            min=1,
        ),
    ] = 1,
    train_only: Annotated[
        bool,
        typer.Option(
            "--train-only", help="Train and cache the experts (and multitask), no scoring."
        ),
    ] = False,
    cached_only: Annotated[
        bool,
        typer.Option(
            "--cached-only",
            help="Train and score nothing: report what the cache holds (methods not "
            "cached are listed as not run).",
        ),
    ] = False,
    show_config: Annotated[
        bool, typer.Option("--show-config", help="Print the resolved settings and exit.")
    ] = False,
) -> None:
    """Zero-shot quality of every method of METHOD.md (per task accuracy, stderr, n, means, cost).

    Trained experts are cached in a coordinator catalog (keyed by task, base weights and
    hyper-parameters), so a re-run only evaluates; the results go to a JSON file and onto
    the catalog's leaderboard. Never tune anything on the held-out tasks.
    """
    from benchmarks import zero_shot as zs

    overrides = {
        "held_in": _task_list(held_in),
        "held_out": _task_list(held_out),
        "methods": None
        if methods is None
        else [m.strip() for m in methods.split(",") if m.strip()],
        "n_eval": n_eval,
        "n_eval_held_out": n_eval_held_out,
        "single_experts_on_held_out": single_experts_on_held_out,
        "eval_limit": eval_limit,
        "steps": steps,
        "gate_steps": gate_steps,
        "multitask_steps": multitask_steps,
        "multitask_batch_size": multitask_batch_size,
        "max_length": max_length,
        "r": r,
        "top_k": top_k,
        "base_model": base_model,
        "precision": precision,
    }
    settings = zs.load_config(preset, config, overrides)
    if show_config:
        import dataclasses

        typer.echo(json.dumps(dataclasses.asdict(settings), indent=2))
        raise typer.Exit()
    try:
        resolved_device = zs.resolve_device(device)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--device") from None
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    output = output or RESULTS_DIR / f"zero-shot-{preset or 'custom'}.json"
    cache_dir = cache_dir or cache_root() / "benchmark-experts"
    from benchmarks.catalog import BenchmarkCatalog, default_catalog_dir

    catalog = catalog or default_catalog_dir()
    with BenchmarkCatalog(catalog, database_url=catalog_database_url) as expert_catalog:
        base_model_pair = None
        parallel_info = None
        if jobs > 1 and not cached_only:
            base_model_pair, parallel_info = _run_jobs(
                settings, jobs, expert_catalog,
                device=str(resolved_device), threads=threads, cache_dir=cache_dir,
                catalog_dir=catalog, catalog_database_url=catalog_database_url,
                train_only=train_only,
            )  # fmt: skip
        record = zs.run_zero_shot(
            settings,
            cache_dir=cache_dir,
            output=output,
            say=typer.echo,
            train_only=train_only,
            cached_only=cached_only or parallel_info is not None,
            catalog=expert_catalog,
            publish=publish and not train_only,
            device=resolved_device,
            base_model=base_model_pair,
            single_experts=_task_list(single_experts),
        )
        hint = expert_catalog.serve_hint()
    if parallel_info is not None:
        record["parallel"] = parallel_info
        output.write_text(zs.record_json(record))
        if parallel_info["failed_jobs"]:
            typer.echo(
                f"results so far: {output}; failed jobs: {', '.join(parallel_info['failed_jobs'])}",
                err=True,
            )
            raise typer.Exit(1)
    if train_only:
        typer.echo(f"trained and cached: {[e['name'] for e in record['experts']]}")
        typer.echo(f"experts catalogued in {expert_catalog.data_dir}")
        return
    table = zs.markdown_table(record)
    output.with_suffix(".md").write_text(table)
    zs.plot_means(record, output.with_suffix(".png"))
    typer.echo(table)
    typer.echo(f"results: {output} (+ .md, .png)")
    if publish:
        typer.echo(hint)


@app.command("zero-shot-scaling")
def zero_shot_scaling(
    preset: Annotated[
        str | None,
        typer.Option(help="The zero-shot run's preset (its experts and caches are reused)."),
    ] = "cpu",
    config: Annotated[
        Path | None,
        typer.Option(help="The zero-shot run's JSON or TOML settings file, if it used one."),
    ] = None,
    sizes: Annotated[
        str, typer.Option(help="Pool sizes below the full pool, comma-separated.")
    ] = "2,4,8",
    pools: Annotated[
        int, typer.Option(help="Random pools per size below the full pool (seeded).", min=1)
    ] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the pools' draw.")] = 0,
    methods: Annotated[
        str,
        typer.Option(help="Methods over each pool, comma-separated (without hyper-parameters)."),
    ] = "phatgoose,merged",
    n_eval_held_out: Annotated[
        int | None,
        typer.Option(
            help="Examples per held-out task (default: the run's); fewer scores faster, but "
            "not the zero-shot run's examples, so its cached scores are not reused.",
        ),
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option(help="Score only the first N examples of each task.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="The zero-shot run's --cache-dir (its evaluation cache)."),
    ] = None,
    catalog: Annotated[
        Path | None, typer.Option(help="The zero-shot run's --catalog (its expert cache).")
    ] = None,
    catalog_database_url: Annotated[
        str | None,
        typer.Option(help="The zero-shot run's --catalog-database-url.", show_default=False),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="The zero-shot run's --precision (default: the preset's, auto).",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Result JSON (default benchmarks/results/zero-shot-scaling-<preset>.json); "
            "a .md table and a .png plot are written beside it."
        ),
    ] = None,
) -> None:
    """Held-out mean of PHATGOOSE and merged over pools of 2, 4, 8 and all experts.

    Three seeded random pools per size (the full pool once), each with its paired
    difference from the base model on the same examples. Uses the zero-shot run's cached
    experts (never trains: run `phatgoose bench zero-shot --train-only` with the same
    settings first) and its evaluation cache, so the full pool and the base are not scored
    again.
    """
    from benchmarks import scaling
    from benchmarks import zero_shot as zs
    from benchmarks.catalog import BenchmarkCatalog, default_catalog_dir

    overrides = {
        "n_eval_held_out": n_eval_held_out,
        "eval_limit": eval_limit,
        "precision": precision,
    }
    settings = zs.load_config(preset, config, overrides)
    try:
        resolved_device = zs.resolve_device(device)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--device") from None
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    output = output or RESULTS_DIR / f"zero-shot-scaling-{preset or 'custom'}.json"
    with BenchmarkCatalog(
        catalog or default_catalog_dir(), database_url=catalog_database_url
    ) as expert_catalog:
        try:
            record = scaling.run_scaling(
                settings,
                cache_dir=cache_dir or cache_root() / "benchmark-experts",
                catalog=expert_catalog,
                sizes=_int_list(sizes),
                pools_per_size=pools,
                seed=seed,
                methods=[m.strip() for m in methods.split(",") if m.strip()],
                device=resolved_device,
                output=output,
                say=typer.echo,
            )
        except zs.NotCached as missing:
            typer.echo(f"error: {missing}", err=True)
            raise typer.Exit(1) from None
    scaling.write(record, output)
    typer.echo(scaling.markdown(record))
    typer.echo(f"results: {output} (+ .md, .png)")


class ParallelRun(TypedDict):
    """The result JSON's `parallel` entry: how the jobs ran."""

    jobs: int
    workdir: str
    job_seconds: dict[str, float]
    failed_jobs: list[str]
    wall_seconds: float


def _run_jobs(
    settings: ZeroShotConfig,
    jobs: int,
    expert_catalog: BenchmarkCatalog,
    *,
    device: str,
    threads: int | None,
    cache_dir: Path,
    catalog_dir: Path,
    catalog_database_url: str | None,
    train_only: bool,
) -> tuple[tuple[PreTrainedModel, PreTrainedTokenizerBase], ParallelRun]:
    """Train, then score, in `jobs` processes (benchmarks/parallel.py); the base model
    (loaded here, to register it before the jobs race to) and what the jobs took."""
    import os
    import time

    from benchmarks import parallel
    from phatgoose.models import load_base_model

    started = time.perf_counter()
    model, tokenizer = load_base_model(settings.base_model)
    expert_catalog.ensure_base_model(model, settings.base_model)
    workdir = parallel.new_workdir(cache_dir)
    common = parallel.child_options(
        settings,
        workdir,
        device=device,
        cache_dir=cache_dir,
        catalog_dir=catalog_dir,
        catalog_database_url=catalog_database_url,
    )
    typer.echo(f"{jobs} jobs at a time; settings, logs and partial results in {workdir}")
    seconds: dict[str, float] = {}
    failed: list[str] = []
    for phase in parallel.plan(settings, jobs, train_only=train_only):
        cpus = threads or parallel.threads_per_job(phase, jobs, os.cpu_count() or 1)
        try:
            seconds |= parallel.run_jobs(
                phase.jobs, [*common, "--threads", str(cpus)],
                workdir=workdir, parallel=jobs, desc=phase.desc,
            )  # fmt: skip
        except parallel.JobsFailed as error:
            typer.echo(str(error), err=True)
            if phase.fatal:  # without its experts, nothing after it can run
                raise typer.Exit(1) from None
            # What the other jobs scored is cached: the assembly reports it and lists the
            # rest as not run, and the command still fails.
            seconds |= error.seconds
            failed = sorted(error.failed)
    info: ParallelRun = {
        "jobs": jobs,
        "workdir": str(workdir),
        "job_seconds": seconds,
        "failed_jobs": failed,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return (model, tokenizer), info


def _int_list(value: str) -> list[int]:
    return [int(part) for part in value.split(",") if part.strip()]


@app.command("routing-cost")
def routing_cost(
    batch_size: Annotated[int, typer.Option(help="Sequences per forward.")] = 4,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    repeats: Annotated[int, typer.Option(help="Timed forwards per configuration (median).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed forwards first.")] = 1,
    n_experts: Annotated[
        str, typer.Option("--n-experts", help="Numbers of experts N, comma-separated.")
    ] = "8,32,166,512",
    implementations: Annotated[
        str,
        typer.Option(
            help="Comma-separated, from: lora (one PEFT adapter), phatgoose (the platform's "
            "routed linear), spectr (the same layer, routed by SpectR's spectral scores), "
            "dense (reference: all N computed, then masked), arrow_peft (PEFT's ArrowConfig). "
            "The base model is always measured."
        ),
    ] = "lora,phatgoose,spectr,dense,arrow_peft",
    precision: Annotated[
        str,
        typer.Option(
            help="Compute precisions, comma-separated, each measured against the base model "
            "in the same precision: float32, bfloat16, auto (this machine's choice)."
        ),
    ] = "float32,bfloat16",
    decode: Annotated[
        bool,
        typer.Option(
            "--decode/--no-decode",
            help="Also time one token per sequence with the prompt in the KV cache.",
        ),
    ] = True,
    config_timeout: Annotated[
        float,
        typer.Option(help="Stop a configuration after this many seconds (0: no limit)."),
    ] = 3600.0,
    rank: Annotated[int, typer.Option(help="Rank of every random expert.")] = 16,
    top_k: Annotated[int, typer.Option(help="Experts per token.")] = 2,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads per process.")] = None,
    train_steps: Annotated[
        int, typer.Option(help="Timed LoRA and gate steps (0: skip the training comparison).")
    ] = 3,
    memory_fraction: Annotated[
        float,
        typer.Option(
            help="Skip a configuration whose expert weights exceed this share of available memory."
        ),
    ] = 0.6,
    reference_max_n: Annotated[
        int,
        typer.Option(help="Largest N for dense and arrow_peft, which compute all N (0: no limit)."),
    ] = 166,
    base_model: Annotated[str, typer.Option(help="Base model name or path.")] = "smollm2-135m",
    output: Annotated[
        Path,
        typer.Option(help="Result JSON; a .md table and a .png plot are written beside it."),
    ] = RESULTS_DIR / "routing-cost.json",
) -> None:
    """Forward latency, tokens/s and peak memory of routed models, as ratios to the base.

    Every configuration runs in its own process, timed interleaved with the base model
    in that process; beside each ratio, the arithmetic floor (base FLOPs + N*n affinity +
    k low-rank products per module) and measured/floor, per compute precision, for the
    batch and for one cached token. Also: gate step vs LoRA step, and bfloat16 speed-ups.
    """
    from benchmarks import routing_cost as rc

    logging.basicConfig(level=logging.WARNING)
    config = rc.RoutingCostConfig(
        base_model=base_model,
        batch_size=batch_size,
        seq_len=seq_len,
        repeats=repeats,
        warmup=warmup,
        n_experts=_int_list(n_experts),
        implementations=[i.strip() for i in implementations.split(",") if i.strip()],
        precisions=[p.strip() for p in precision.split(",") if p.strip()],
        decode=decode,
        config_timeout_s=config_timeout or None,
        rank=rank,
        top_k=top_k,
        threads=threads,
        memory_fraction=memory_fraction,
        reference_max_n=reference_max_n or None,
        train_steps=max(train_steps, 1),
    )
    record = rc.run_routing_cost(config, training=train_steps > 0, output=output)
    table = rc.markdown_table(record)
    output.with_suffix(".md").write_text(table)
    rc.plot(record, output.with_suffix(".png"))
    typer.echo(table)
    typer.echo(f"results: {output} (+ .md, .png)")


@app.command("precision")
def precision_effects(
    preset: Annotated[
        str,
        typer.Option(help="The zero-shot preset: tasks and settings (its committed run: cpu-4)."),
    ] = "cpu-4",
    task: Annotated[
        str | None,
        typer.Option(
            help="Held-in task whose expert is trained in both precisions.",
            show_default="the preset's first",
        ),
    ] = None,
    stages: Annotated[
        bool, typer.Option("--stages/--no-stages", help="Train one expert in each precision.")
    ] = True,
    scoring: Annotated[
        bool,
        typer.Option(
            "--scoring/--no-scoring",
            help="Score base and PHATGOOSE on every preset task in each precision.",
        ),
    ] = True,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="The zero-shot expert cache.", show_default=False)
    ] = None,
    catalog: Annotated[
        Path | None, typer.Option(help="The zero-shot catalog.", show_default=False)
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Result JSON (default benchmarks/results/precision-<preset>.json)."),
    ] = None,
) -> None:
    """bfloat16 against float32 on the real model: per-stage time of one expert, its
    validation loss (paired, measured in float32), and the predictions and accuracies of
    base and PHATGOOSE on every preset task scored both ways.

    PHATGOOSE uses the preset's experts from the zero-shot cache, trained in this machine's
    `auto` precision (trained and cached first if missing). First, plain matrix products in
    both precisions; `ONEDNN_MAX_CPU_ISA=AVX512_CORE` in the environment shows a CPU
    without native bfloat16 units.
    """
    from benchmarks import precision_effects as pe
    from benchmarks import zero_shot as zs
    from benchmarks.catalog import BenchmarkCatalog, default_catalog_dir
    from benchmarks.machine import load_average, machine_info
    from phatgoose.models import load_base_model, model_fingerprint
    from protocol import BaseModelIdentity

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    machine = machine_info()
    settings, compute = zs.with_resolved_precision(zs.load_config(preset=preset), "cpu")
    output = output or RESULTS_DIR / f"precision-{preset}.json"
    tasks = zs.load_tasks(settings)
    held_in = [t for t in tasks if t.held_in]
    chosen = next((t for t in held_in if t.name == (task or held_in[0].name)), None)
    if chosen is None:
        raise typer.BadParameter(f"not a held-in task of preset {preset}", param_hint="--task")
    model, tokenizer = load_base_model(settings.base_model)
    base = BaseModelIdentity(name=settings.base_model, fingerprint=model_fingerprint(model))
    record: dict[str, object] = {
        "preset": preset,
        "auto_precision": compute.record(),
        "matmul": pe.matmul_speed(),
    }
    if stages or scoring:  # the rest takes minutes: show the products now
        typer.echo(pe.markdown({"matmul": record["matmul"]}))
    if stages:
        record["stages"] = pe.stage_timings(
            model, tokenizer, chosen, settings, base=base, say=typer.echo
        )
        pe.write(record, output)
    if scoring:
        with BenchmarkCatalog(catalog or default_catalog_dir()) as expert_catalog:
            experts = [
                zs.task_expert(
                    model, tokenizer, t, settings,
                    cache_dir or cache_root() / "benchmark-experts",
                    base=base, catalog=expert_catalog, progress=False,
                )[0]
                for t in held_in
            ]  # fmt: skip
        record["scoring"] = pe.scoring_agreement(
            model, tokenizer, tasks, experts, settings, say=typer.echo
        )
    record["machine"] = {**machine, "load_average_end": load_average()}
    pe.write(record, output)
    typer.echo(pe.markdown(record))
    typer.echo(f"results: {output} (+ .md)")


@app.command("router-scale")
def router_scale(
    preset: Annotated[
        str,
        typer.Option(help="The zero-shot preset whose experts to use (its committed run: cpu-4)."),
    ] = "cpu-4",
    more_gate_steps: Annotated[
        str, typer.Option(help="Gate steps to retrain every expert's gates with, comma-separated.")
    ] = "64",
    catalog: Annotated[
        Path | None, typer.Option(help="The zero-shot benchmark's catalog (its expert cache).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="The zero-shot benchmark's --cache-dir.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Result JSON (default benchmarks/results/router-scale-<preset>.json)."),
    ] = None,
) -> None:
    """Router numerics 1 (LayerNorm's eps on gate rows) against 2 (scale-free), held-in only.

    Reads the preset's experts from the zero-shot cache (train them first with
    `phatgoose bench zero-shot --preset P --train-only`); reports gate variances, each
    numerics' held-in accuracy (paired, with a bootstrap interval) and the share of routing
    that goes to each task's own expert, and the same after retraining gates for longer.
    """
    from benchmarks import router_scale as rs
    from benchmarks import zero_shot as zs
    from benchmarks.catalog import BenchmarkCatalog, default_catalog_dir
    from benchmarks.machine import load_average, machine_info
    from phatgoose.models import load_base_model, model_fingerprint
    from protocol import BaseModelIdentity

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    machine = machine_info()  # the date and load at the start
    settings, compute = zs.with_resolved_precision(zs.load_config(preset=preset), "cpu")
    output = output or RESULTS_DIR / f"router-scale-{preset}.json"
    tasks = [t for t in zs.load_tasks(settings) if t.held_in]
    model, tokenizer = load_base_model(settings.base_model)
    base = BaseModelIdentity(name=settings.base_model, fingerprint=model_fingerprint(model))
    with BenchmarkCatalog(catalog or default_catalog_dir()) as expert_catalog:
        experts = [
            zs.task_expert(
                model, tokenizer, task, settings, cache_dir or cache_root() / "benchmark-experts",
                base=base, cached_only=True, catalog=expert_catalog, progress=False,
            )[0]
            for task in tasks
        ]  # fmt: skip
    record = rs.run_router_scale(
        model, tokenizer, experts, tasks, settings,
        more_gate_steps=_int_list(more_gate_steps), say=typer.echo,
    )  # fmt: skip
    record["machine"] = {**machine, "load_average_end": load_average()}
    record["precision"] = compute.record()
    rs.write(record, output)
    typer.echo(rs.markdown(record))
    typer.echo(f"results: {output} (+ .md)")


@app.command("delta-bytes")
def delta_bytes(
    base_model: Annotated[str, typer.Option(help="Base model name or path.")] = "smollm2-135m",
    task: Annotated[str, typer.Option(help="BIG-bench task of the expert and its versions.")] = (
        "hyperbaton"
    ),
    other_task: Annotated[str, typer.Option(help="BIG-bench task of the unrelated expert.")] = (
        "navigate"
    ),
    steps: Annotated[int, typer.Option(help="LoRA steps per training.", min=1)] = 20,
    gate_steps: Annotated[int, typer.Option(help="Gate steps per training.", min=1)] = 20,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Result JSON (default benchmarks/results/delta-bytes.json)."),
    ] = None,
) -> None:
    """Bytes sent and stored per new expert version (delta push): a first expert, its gates
    retrained, its LoRA trained further, and an unrelated expert, each pushed to a
    coordinator on loopback whose blob store is measured."""
    from benchmarks import delta_bytes as db
    from benchmarks.machine import load_average, machine_info

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    machine = machine_info()
    config = db.DeltaBytesConfig(
        base_model=base_model, task=task, other_task=other_task, steps=steps, gate_steps=gate_steps
    )
    result = db.run(config)
    result["machine"] = {**machine, "load_average_end": load_average()}
    output = output or RESULTS_DIR / "delta-bytes.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    text = db.markdown(result, result["machine"])
    output.with_suffix(".md").write_text(text)
    typer.echo(text)
    typer.echo(f"results: {output} (+ .md)")


@app.command("privacy")
def privacy(
    base_model: Annotated[str, typer.Option(help="Base model name or path.")] = "smollm2-135m",
    task: Annotated[str, typer.Option(help="The held-in BIG-bench task audited.")] = "social_iqa",
    members: Annotated[int, typer.Option(help="Training examples (members).", min=2)] = 256,
    non_members: Annotated[
        int, typer.Option(help="Held-out examples of the task (non-members).", min=2)
    ] = 256,
    shadow: Annotated[
        int, typer.Option(help="Examples of the shadow LoRA the gates-alone expert uses.", min=1)
    ] = 256,
    steps: Annotated[int, typer.Option(help="LoRA steps.", min=1)] = 80,
    gate_steps: Annotated[int, typer.Option(help="Gate steps.", min=1)] = 16,
    epsilons: Annotated[str, typer.Option(help="DP epsilons to audit, comma-separated.")] = "8,1",
    variants: Annotated[
        str, typer.Option(help="Experts to audit, comma-separated: lora, dp-eps<E>, gates.")
    ] = "lora,dp-eps8,dp-eps1,gates",
    retrieval: Annotated[bool, typer.Option(help="Also audit the retrieval embeddings.")] = True,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.", min=100)] = 2000,
    resume: Annotated[
        bool, typer.Option(help="Continue the record at --output (same settings) where it stopped.")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Result JSON (default benchmarks/results/privacy.json; + .md, .png)."),
    ] = None,
) -> None:
    """Membership-inference audit of an expert trained on one held-in task: the
    loss-threshold and calibrated attacks (AUC, TPR at 1% FPR, bootstrap intervals) on its
    training examples against held-out ones, for the LoRA without DP, with DP at each
    epsilon, and the gates alone, with own-task accuracy beside each; and how the retrieval
    embeddings give members away. The record is saved after every expert (see --resume)."""
    import sys

    from benchmarks import privacy as audit
    from benchmarks.machine import load_average, machine_info

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    machine = machine_info()
    machine["command"] = "phatgoose bench " + " ".join(sys.argv[sys.argv.index("privacy") :])
    config = audit.PrivacyAuditConfig(
        base_model=base_model,
        task=task,
        members=members,
        non_members=non_members,
        shadow=shadow,
        steps=steps,
        gate_steps=gate_steps,
        epsilons=tuple(float(e) for e in epsilons.split(",") if e.strip()),
        resamples=resamples,
    )
    output = output or RESULTS_DIR / "privacy.json"
    cache = json.loads(output.read_text()) if resume and output.exists() else None
    if cache is not None:
        machine = {**cache.get("machine", machine), "resumed": machine["date"]}

    def save(record: dict[str, object]) -> None:
        output.write_text(json.dumps({**record, "machine": machine}, indent=2) + "\n")

    try:
        record = audit.run(
            config,
            variants=[v.strip() for v in variants.split(",") if v.strip()],
            retrieval=retrieval,
            cache=cache,
            save=save,
        )
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    machine["load_average_end"] = load_average()
    record["complete"] = True
    save(record)
    text = audit.markdown(record, machine)
    output.with_suffix(".md").write_text(text)
    audit.plot(record, output.with_suffix(".png"))
    typer.echo(text)
    typer.echo(f"results: {output} (+ .md, .png)")
