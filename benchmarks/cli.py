"""`phatgoose bench`: the benchmarks' command line (mounted by the root CLI)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import torch
import typer

from phatgoose.models import cache_root

app = typer.Typer(
    help=(
        "Benchmarks. `zero-shot`: train one expert per held-in BIG-bench task and score every "
        "routing method on held-out and held-in tasks (BENCHMARK.md). `routing-cost`: forward "
        "latency, throughput and memory of routed models against the base model."
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
            help="Preset: 'cpu' (BENCHMARK.md's reference settings, ~1 h on 2 idle cores), "
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
            help="Methods, comma-separated, from: base, phatgoose, merged, arrow, "
            "average_activation, retrieval, oracle, best_individual, multitask."
        ),
    ] = None,
    n_eval: Annotated[int | None, typer.Option(help="Evaluation examples per task.")] = None,
    steps: Annotated[int | None, typer.Option(help="LoRA steps per expert.")] = None,
    gate_steps: Annotated[int | None, typer.Option(help="Gate steps per expert.")] = None,
    multitask_steps: Annotated[
        int | None, typer.Option(help="Multitask LoRA steps (default: steps x experts).")
    ] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per training sequence.")] = None,
    r: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Experts per token (token routers).")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model name or path.")] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where trained expert packages are cached (default: the phatgoose cache)."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Result JSON (default benchmarks/results/zero-shot-<preset>.json); "
            "a .md table and a .png plot are written beside it."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    show_config: Annotated[
        bool, typer.Option("--show-config", help="Print the resolved settings and exit.")
    ] = False,
) -> None:
    """Zero-shot quality of every method of METHOD.md (per task accuracy, stderr, n, means, cost).

    Trained experts are cached (keyed by task, base weights and hyper-parameters), so a
    re-run only evaluates. Never tune anything on the held-out tasks.
    """
    from benchmarks import zero_shot as zs

    overrides = {
        "held_in": _task_list(held_in),
        "held_out": _task_list(held_out),
        "methods": None
        if methods is None
        else [m.strip() for m in methods.split(",") if m.strip()],
        "n_eval": n_eval,
        "steps": steps,
        "gate_steps": gate_steps,
        "multitask_steps": multitask_steps,
        "max_length": max_length,
        "r": r,
        "top_k": top_k,
        "base_model": base_model,
    }
    settings = zs.load_config(preset, config, overrides)
    if show_config:
        import dataclasses

        typer.echo(json.dumps(dataclasses.asdict(settings), indent=2))
        raise typer.Exit()
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    output = output or RESULTS_DIR / f"zero-shot-{preset or 'custom'}.json"
    record = zs.run_zero_shot(
        settings,
        cache_dir=cache_dir or cache_root() / "benchmark-experts",
        output=output,
        say=typer.echo,
    )
    table = zs.markdown_table(record)
    output.with_suffix(".md").write_text(table)
    zs.plot_means(record, output.with_suffix(".png"))
    typer.echo(table)
    typer.echo(f"results: {output} (+ .md, .png)")
