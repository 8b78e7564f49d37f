"""`phatgoose client ...`: the contributor's commands.

    train       data -> LoRA -> gates -> an expert package in a directory
    import-peft an existing PEFT LoRA adapter + data -> gates -> an expert package
    inspect     what a package holds, and whether the coordinator would accept it
    push        publish a package to a coordinator (HTTP, with a token)
    diff        what changed between two packages (local directories or published versions)

Training runs entirely on this machine; only the package (parameters, router vectors and
the manifest) is ever uploaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.precision import Precision
from protocol.privacy import DEFAULT_MAX_GRAD_NORM

if TYPE_CHECKING:  # torch and transformers load slowly: --help stays fast without them
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from client.inspection import PackageReport
    from client.training import ContributorOptions
    from phatgoose.training import DifferentialPrivacy, TrainingConfig
    from protocol.diff import PackageDiff
    from protocol.privacy import PrivacyGuarantee

app = typer.Typer(
    help="Contributors: train an expert on private data, inspect it, publish it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# soft_wrap: messages stay whole lines (a path in an error is never folded mid-name).
console = Console(stderr=True, soft_wrap=True)

# ------------------------------------------------------------------ shared options
DataOption = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Private training data: a JSONL file ({'input','target'} or "
        "{'input','choices','answer'} per line) or a BIG-bench task.json.",
        exists=True,
        dir_okay=True,
    ),
]
BaseOption = Annotated[
    str,
    typer.Option(
        "--base",
        help="Base model: 'smollm2-135m' (bundled SmolLM2-135M-Instruct) or a local "
        "Hugging Face model directory.",
    ),
]
BaseNameOption = Annotated[
    str | None,
    typer.Option(
        "--base-name",
        help="The base model's name as the coordinator registered it (default: --base).",
        show_default=False,
    ),
]
OutOption = Annotated[
    Path, typer.Option("--out", help="Directory to write the expert package into.")
]
ResumeOption = Annotated[
    Path | None,
    typer.Option(
        "--resume-from",
        help="An earlier version's package directory (e.g. its --out): LoRA training "
        "continues from its tensors, with its rank, alpha and target modules (--rank and "
        "--alpha are then ignored), and the gates are trained again. `push` then sends only "
        "the tensors that changed.",
        exists=True,
        file_okay=False,
        show_default=False,
    ),
]
RankOption = Annotated[int, typer.Option("--rank", help="LoRA rank r.", min=1)]
AlphaOption = Annotated[float, typer.Option("--alpha", help="LoRA alpha (scale = alpha / r).")]
StepsOption = Annotated[int, typer.Option("--steps", help="LoRA training steps.", min=1)]
GateStepsOption = Annotated[
    int, typer.Option("--gate-steps", help="Gate training steps (about a tenth of LoRA's).", min=1)
]
BatchOption = Annotated[int, typer.Option("--batch-size", help="Examples per step.", min=1)]
MaxLengthOption = Annotated[
    int, typer.Option("--max-length", help="Tokens per example (longer ones are cut).", min=2)
]
LrOption = Annotated[float, typer.Option("--lr", help="LoRA learning rate (AdamW).")]
GateLrOption = Annotated[
    float | None,
    typer.Option("--gate-lr", help="Gate learning rate (default: --lr).", show_default=False),
]
MaxExamplesOption = Annotated[
    int | None,
    typer.Option(
        "--max-examples",
        help="Use a seeded sample of at most this many examples.",
        min=1,
        show_default=False,
    ),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for sampling, splits and init.")]
PrecisionOption = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="Compute precision: auto (bfloat16 where this CPU/GPU multiplies it natively, "
        "else float32), float32 or bfloat16. The expert is saved in float32 either way; "
        "its manifest records what was used.",
    ),
]
AverageActivationOption = Annotated[
    bool | None,
    typer.Option(
        "--average-activation/--no-average-activation",
        help="Also ship each module's mean input activation (the Average-activation "
        "baseline). Default: yes, except under --dp-epsilon, which refuses it.",
        show_default=False,
    ),
]
DpEpsilonOption = Annotated[
    float | None,
    typer.Option(
        "--dp-epsilon",
        help="Train with differential privacy (DP-SGD): the LoRA and the gates together are "
        "(epsilon, delta)-DP for each training example. Smaller is more private (8 is "
        "common, 1 is strong) and costs more accuracy. No validation split, average "
        "activations, retrieval embeddings or --resume-from under DP. See docs/privacy.md.",
        show_default=False,
    ),
]
DpDeltaOption = Annotated[
    float | None,
    typer.Option(
        "--dp-delta",
        help="DP's delta (default: 1e-5, or 1/(10 n) for n > 10,000 examples); must be below 1/n.",
        show_default=False,
    ),
]
DpClipOption = Annotated[
    float,
    typer.Option(
        "--dp-max-grad-norm",
        help="Under DP, each example's gradient is clipped to this L2 norm.",
    ),
]
RetrievalOption = Annotated[
    bool,
    typer.Option(
        "--retrieval-embeddings",
        help="Also ship MiniLM embeddings of up to 1000 training inputs (the Retrieval "
        "baseline). PRIVACY: these embeddings leak information about your private data.",
    ),
]
DescriptionOption = Annotated[str, typer.Option("--description", help="What the expert is for.")]
LicenseOption = Annotated[str, typer.Option("--license", help="SPDX licence of the expert.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _options(
    description: str,
    license: str,
    max_examples: int | None,
    average_activation: bool,
    retrieval_embeddings: bool,
    quiet: bool,
) -> ContributorOptions:
    """What `train` and `import-peft` share beyond the hyper-parameters."""
    from client.training import ContributorOptions

    return ContributorOptions(
        description=description,
        license=license,
        max_examples=max_examples,
        average_activation=average_activation,
        retrieval_embeddings=retrieval_embeddings,
        progress=not quiet,
    )


def _config(
    rank: int,
    alpha: float,
    steps: int,
    gate_steps: int,
    batch_size: int,
    max_length: int,
    lr: float,
    gate_lr: float | None,
    seed: int,
    precision: Precision,
    dp: DifferentialPrivacy | None = None,
) -> TrainingConfig:
    from phatgoose.training import TrainingConfig

    return TrainingConfig(
        r=rank,
        lora_alpha=alpha,
        steps=steps,
        gate_steps=gate_steps,
        batch_size=batch_size,
        max_length=max_length,
        learning_rate=lr,
        gate_learning_rate=gate_lr,
        seed=seed,
        precision=precision,
        dp=dp,
    )


def _privacy(
    epsilon: float | None, delta: float | None, max_grad_norm: float
) -> DifferentialPrivacy | None:
    """`--dp-*` as the training's privacy settings (None without --dp-epsilon); a bad value
    ends the command with its field named."""
    from phatgoose.training import DifferentialPrivacy

    if epsilon is None:
        if delta is not None:
            console.print("[red]error:[/red] --dp-delta needs --dp-epsilon")
            raise typer.Exit(2)
        return None
    try:
        return DifferentialPrivacy(epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None


def _say(message: str) -> None:
    style = "yellow" if message.startswith("warning") else "cyan"
    console.print(f"[{style}]{message}[/{style}]")


def _confirm_retrieval(retrieval: bool) -> None:
    if retrieval:
        from phatgoose.training import PRIVACY_WARNING

        console.print(f"[bold yellow]Privacy:[/bold yellow] {PRIVACY_WARNING}")


# ------------------------------------------------------------------------ commands
@app.command()
def train(
    data: DataOption,
    name: Annotated[str, typer.Option("--name", help="Expert name: 'slug' or 'namespace/slug'.")],
    out: OutOption,
    base: BaseOption = "smollm2-135m",
    base_name: BaseNameOption = None,
    rank: RankOption = 8,
    alpha: AlphaOption = 16.0,
    steps: StepsOption = 80,
    gate_steps: GateStepsOption = 16,
    batch_size: BatchOption = 8,
    max_length: MaxLengthOption = 192,
    lr: LrOption = 1e-3,
    gate_lr: GateLrOption = None,
    max_examples: MaxExamplesOption = None,
    seed: SeedOption = 0,
    precision: PrecisionOption = "auto",
    average_activation: AverageActivationOption = None,
    retrieval_embeddings: RetrievalOption = False,
    description: DescriptionOption = "",
    license: LicenseOption = "Apache-2.0",
    quiet: QuietOption = False,
    resume_from: ResumeOption = None,
    dp_epsilon: DpEpsilonOption = None,
    dp_delta: DpDeltaOption = None,
    dp_max_grad_norm: DpClipOption = DEFAULT_MAX_GRAD_NORM,
) -> None:
    """Train an expert on private data: LoRA, then its PHATGOOSE gates.

    The data never leaves this machine; the package written to --out holds only
    parameters, router vectors and a manifest. Defaults suit a CPU (BENCHMARK.md's
    reference settings); the paper uses --rank 16 --lr 5e-3 and ~1000 steps.

    A new version: --resume-from the last one continues its LoRA; `import-peft` of a
    package directory retrains only its gates. Either way, `push` sends only what changed.

    --dp-epsilon 8 trains with differential privacy: the manifest then states the
    guarantee, which the coordinator checks and shows (docs/privacy.md).
    """
    from client.training import train_contributor_expert
    from phatgoose.data import DataFormatError
    from phatgoose.expert import Expert

    _confirm_retrieval(retrieval_embeddings)
    earlier = None
    if resume_from is not None:
        try:
            earlier = Expert.load(resume_from)
        except (OSError, ValueError) as error:  # ExpertError is a ValueError
            console.print(f"[red]error:[/red] --resume-from {resume_from}: {error}")
            raise typer.Exit(2) from None
    dp = _privacy(dp_epsilon, dp_delta, dp_max_grad_norm)
    config = _config(
        rank, alpha, steps, gate_steps, batch_size, max_length, lr, gate_lr, seed, precision, dp
    )
    average = dp is None if average_activation is None else average_activation
    options = _options(description, license, max_examples, average, retrieval_embeddings, quiet)
    try:
        expert = train_contributor_expert(
            data,
            name,
            base=base_name or base,
            config=config,
            options=options,
            base_model=_load_base(base),
            say=_say,
            resume_from=earlier,
        )
    except (DataFormatError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    expert.save(out)
    _print_summary(out)


@app.command("import-peft")
def import_peft(
    adapter_dir: Annotated[
        Path,
        typer.Argument(
            help="A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).",
            exists=True,
            file_okay=False,
        ),
    ],
    data: DataOption,
    out: OutOption,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Expert name (default: the adapter directory's name)."),
    ] = None,
    base: BaseOption = "smollm2-135m",
    base_name: BaseNameOption = None,
    gate_steps: GateStepsOption = 16,
    batch_size: BatchOption = 8,
    max_length: MaxLengthOption = 192,
    lr: Annotated[float, typer.Option("--lr", help="Gate learning rate (AdamW).")] = 1e-3,
    max_examples: MaxExamplesOption = None,
    seed: SeedOption = 0,
    precision: PrecisionOption = "auto",
    average_activation: AverageActivationOption = None,
    retrieval_embeddings: RetrievalOption = False,
    description: DescriptionOption = "",
    license: LicenseOption = "Apache-2.0",
    quiet: QuietOption = False,
) -> None:
    """Make an existing PEFT LoRA adapter an expert by training only its gates.

    The adapter must have been trained on the same base model; its LoRA weights are kept
    unchanged.
    """
    from client.training import import_peft_expert
    from phatgoose.data import DataFormatError
    from phatgoose.expert import ExpertError
    from protocol import slug

    _confirm_retrieval(retrieval_embeddings)
    config = _config(
        8, 16.0, gate_steps, gate_steps, batch_size, max_length, lr, lr, seed, precision
    )
    average = True if average_activation is None else average_activation
    options = _options(description, license, max_examples, average, retrieval_embeddings, quiet)
    try:
        expert = import_peft_expert(
            adapter_dir,
            data,
            name or slug(adapter_dir.resolve().name),
            base=base_name or base,
            config=config,
            options=options,
            base_model=_load_base(base),
            say=_say,
        )
    except (DataFormatError, ExpertError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    expert.save(out)
    _print_summary(out)


@app.command()
def inspect(
    directory: Annotated[
        Path, typer.Argument(help="An expert package directory.", exists=True, file_okay=False)
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model to check against, loaded locally (default: the one the "
            "manifest names).",
            show_default=False,
        ),
    ] = None,
    base_name: BaseNameOption = None,
) -> None:
    """Show what a package holds and whether the coordinator would accept it.

    Runs the coordinator's own admission checks (protocol.validation) locally, against the
    base model's spec computed from the local copy of the base model. Exits with 1 when the
    package would be rejected.
    """
    from client.inspection import inspect_package, manifest_base_name

    base = base or manifest_base_name(directory) or "smollm2-135m"
    with console.status(f"loading base model {base}"):
        model = _load_base(base)[0]
    report = inspect_package(directory, base=base_name or base, base_model=model)
    _print_report(report)
    if not report.passes:
        raise typer.Exit(1)


@app.command()
def push(
    directory: Annotated[
        Path, typer.Argument(help="An expert package directory.", exists=True, file_okay=False)
    ],
    coordinator: Annotated[
        str,
        typer.Option(
            "--coordinator",
            help="Coordinator URL, e.g. http://127.0.0.1:8765 (or $PHATGOOSE_COORDINATOR).",
            envvar="PHATGOOSE_COORDINATOR",
        ),
    ],
    token: Annotated[
        str,
        typer.Option(
            "--token",
            help="Your upload token from `phatgoose coordinator create-token` "
            "(or $PHATGOOSE_TOKEN).",
            envvar="PHATGOOSE_TOKEN",
        ),
    ],
    attempts: Annotated[
        int, typer.Option("--attempts", help="Tries on connection errors, 5xx and 429.", min=1)
    ] = 5,
    whole: Annotated[
        bool,
        typer.Option(
            "--whole",
            help="Send every file whole, not only the tensors the coordinator lacks.",
        ),
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Publish a package as a new version of its expert.

    Sends only the tensors the coordinator does not hold yet (it asks first): a new version
    that retrained only the gates sends the gates. The coordinator rebuilds the whole package,
    checks it like any upload and answers with the same digest. Retries with backoff on
    connection errors, 5xx and 429; a rejection (4xx) is reported with the file, check,
    tensor and expectation that failed, and exits with 1.
    """
    from client.push import PushError, PushRejected, RetryPolicy, Transfer, push_package

    try:
        version = push_package(
            directory,
            coordinator,
            token,
            retry=RetryPolicy(attempts=attempts),
            progress=not quiet,
            delta=not whole,
        )
    except PushRejected as rejection:
        console.print(f"[red]{rejection.report()}[/red]")
        raise typer.Exit(1) from None
    except PushError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    console.print(
        f"[green]published[/green] {version['ref']} ({version['package_digest']}, "
        f"{version['total_size']} bytes)"
    )
    console.print(Transfer(**version["transfer"]).describe())
    typer.echo(version["ref"])


@app.command()
def diff(
    a: Annotated[
        str,
        typer.Argument(
            help="The reference: a package directory, or namespace/name@version on the coordinator."
        ),
    ],
    b: Annotated[str, typer.Argument(help="The package compared with it, given the same way.")],
    coordinator: Annotated[
        str | None,
        typer.Option(
            "--coordinator",
            help="Coordinator URL for namespace/name@version (or $PHATGOOSE_COORDINATOR).",
            envvar="PHATGOOSE_COORDINATOR",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="A token, when the coordinator's reads need one (or $PHATGOOSE_TOKEN).",
            envvar="PHATGOOSE_TOKEN",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole diff as JSON instead of tables.")
    ] = False,
    modules: Annotated[
        bool, typer.Option("--modules", help="Also print one row per module.")
    ] = False,
) -> None:
    """What changed from package A to package B (two experts on the same base model).

    Per module: the relative change of the full LoRA update,
    ||s_B B_B A_B - s_A B_A A_A||_F / ||s_A B_A A_A||_F (0: the same update; 1: a change
    as large as A's update), computed from the factors without forming any d x n matrix;
    the ranks; the cosine between the two gates (1: they route alike); and which tensors
    are byte-identical. Per file: whether its bytes are identical. Printed as a summary
    and a table per layer. Published versions are downloaded to a temporary folder and
    checked against the sha256 the coordinator lists. Exits with 1 when the packages
    cannot be compared (different base models, unreadable files).
    """
    import tempfile

    from client.catalog import FetchError
    from protocol.diff import DiffError, diff_packages

    with tempfile.TemporaryDirectory(prefix="phatgoose-diff-") as folder:
        try:
            path_a = _package_source(a, "A", coordinator, token, Path(folder) / "a")
            path_b = _package_source(b, "B", coordinator, token, Path(folder) / "b")
            result = diff_packages(path_a, path_b)
        except (DiffError, FetchError) as error:
            console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(1) from None
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    _print_diff(result, a, b, with_modules=modules)


def _package_source(
    given: str, label: str, coordinator: str | None, token: str | None, folder: Path
) -> Path:
    """A local package directory as it is; a published version downloaded into `folder`."""
    from client.catalog import fetch_version, parse_ref

    if Path(given).is_dir():
        return Path(given)
    ref = parse_ref(given)
    if ref is None:
        console.print(
            f"[red]error:[/red] {label} {escape(given)!r} is neither a package directory nor "
            "namespace/name@version"
        )
        raise typer.Exit(2)
    if not coordinator:
        console.print(
            f"[red]error:[/red] {label} {escape(given)} is a published version: "
            "give --coordinator URL (or $PHATGOOSE_COORDINATOR)"
        )
        raise typer.Exit(2)
    with console.status(f"downloading {ref} from {coordinator}"):
        fetch_version(ref, coordinator, folder, token=token)
    return folder


# ------------------------------------------------------------------------ output
def _load_base(base: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from phatgoose.models import load_base_model

    with console.status(f"loading base model {base}"):
        return load_base_model(base)


def _print_summary(out: Path) -> None:
    from phatgoose.expert import Expert

    expert = Expert.load(out)
    m = expert.manifest
    table = Table(title=f"expert {m.name}", show_header=False)
    table.add_row("base model", f"{m.base_model.name} ({m.base_model.fingerprint[:19]}...)")
    table.add_row("LoRA", f"r={m.lora.r}, alpha={m.lora.lora_alpha:g}, {m.lora.modules} modules")
    t = m.training
    table.add_row("examples", str(t.examples))
    table.add_row(
        "LoRA steps",
        f"{t.steps} (final loss {_fmt(t.final_loss)}, "
        f"best validation {_fmt(t.best_validation_loss)})",
    )
    table.add_row("gate steps", f"{t.gate_steps} (final loss {_fmt(t.final_gate_loss)})")
    computed = {t.precision, t.gate_precision} - {None}
    table.add_row("computed in", " + ".join(sorted(str(c) for c in computed)) or "not recorded")
    table.add_row("average activation", "yes" if m.has_average_activation else "no")
    table.add_row("retrieval embeddings", "yes (leaks!)" if m.has_retrieval_embeddings else "no")
    table.add_row("privacy", _privacy_summary(m.privacy))
    for path in sorted(out.iterdir()):
        table.add_row(f"  {path.name}", f"{path.stat().st_size:,} bytes")
    console.print(table)
    console.print(f"written to [bold]{out}[/bold]; next: phatgoose client inspect {out}")


def _privacy_summary(guarantee: PrivacyGuarantee | None) -> str:
    if guarantee is None:
        return "no DP guarantee"
    return (
        f"{guarantee.summary()}; clip {guarantee.max_grad_norm:g}, noise "
        f"{guarantee.noise_multiplier:.3f}, rate {guarantee.sample_rate:.4g}, "
        f"{guarantee.steps} steps"
    )


def _print_report(report: PackageReport) -> None:
    table = Table(title=f"package {report.directory}", show_header=False)
    for name, size in report.files.items():
        table.add_row(name, f"{size:,} bytes")
    for name in report.extra_files:
        table.add_row(name, "[yellow]not a package file (never uploaded)[/yellow]")
    if report.expert is not None:
        e, m = report.expert, report.expert.manifest
        table.add_row("name", m.name)
        table.add_row("base model", f"{m.base_model.name} ({m.base_model.fingerprint})")
        table.add_row("LoRA", f"rank {e.rank}, {len(e.module_paths())} modules")
        table.add_row("gates", "yes" if e.has_gates else "[red]no[/red]")
        table.add_row("average activation", "yes" if m.has_average_activation else "no")
        table.add_row("retrieval embeddings", "yes" if m.has_retrieval_embeddings else "no")
        table.add_row("privacy", _privacy_summary(m.privacy))
        table.add_row(
            "training",
            f"{m.training.examples} examples, {m.training.steps} steps, "
            f"{m.training.gate_steps} gate steps",
        )
    elif report.load_error:
        table.add_row("[red]unreadable[/red]", report.load_error)
    console.print(table)
    if report.accepted is not None:
        console.print(
            f"[green]passes admission[/green] against base model '{report.base}' "
            f"(digest {report.accepted.digest})"
        )
    else:
        r = report.rejection or {}
        console.print(f"[red]would be rejected[/red]: {r.get('message')}")
        for key in ("check", "file", "tensor", "expected"):
            if r.get(key):
                console.print(f"  {key}: {r[key]}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_diff(result: PackageDiff, label_a: str, label_b: str, *, with_modules: bool) -> None:
    """The summary and the per-layer table, on stdout: they are the command's output."""
    out = Console(highlight=False, soft_wrap=True)  # lines stay whole, for grep and pipes
    if not out.is_terminal:
        out.width = 200  # a pipe has no width: keep module paths whole rather than cut at 80
    s = result.summary
    for label, side in (("A", label_a), ("B", label_b)):
        info = result.a if label == "A" else result.b
        lora = info.lora
        out.print(
            f"{label}: {escape(side)} ({escape(info.name)}, r={lora.r}, alpha {lora.lora_alpha:g}, "
            f"scale {lora.scale:g}{', rsLoRA' if lora.use_rslora else ''}, {info.modules} modules)"
        )
    files = ", ".join(
        f"{f.filename} {'identical' if f.identical else 'differs'}" for f in result.files
    )
    out.print(f"files: {files}")
    out.print(
        f"modules: {s.modules_changed} changed, {s.modules_unchanged} unchanged, "
        f"{s.modules_added} added, {s.modules_removed} removed; LoRA byte-identical in "
        f"{s.lora_identical_modules}, gates byte-identical in {s.gate_identical_modules}"
    )
    shared = s.modules_changed + s.modules_unchanged
    if shared and s.lora_identical_modules == shared and s.gate_identical_modules < shared:
        out.print("[bold]the LoRA weights are identical: only gates changed[/bold]")
    largest = f" ({escape(s.max_relative_change_module)})" if s.max_relative_change_module else ""
    out.print(
        f"relative change: median {_num(s.median_relative_change)}, "
        f"max {_num(s.max_relative_change)}{largest}; "
        f"mean gate cosine {_num(s.mean_gate_cosine)}"
    )
    table = Table(title="per layer", box=box.SIMPLE_HEAD)
    widest = max((len(layer.layer) for layer in result.layers), default=5)
    table.add_column("layer", min_width=min(widest, 40), overflow="fold")
    for column in ("modules", "changed", "added/removed", "mean change", "max change"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("gate cosine", justify="right", no_wrap=True)
    for layer in result.layers:
        table.add_row(
            escape(layer.layer),
            str(layer.modules),
            str(layer.changed),
            f"{layer.added}/{layer.removed}",
            _num(layer.mean_relative_change),
            _num(layer.max_relative_change),
            _num(layer.mean_gate_cosine),
        )
    out.print(table)
    if with_modules:
        per_module = Table(title="per module", box=box.SIMPLE_HEAD)
        widest = max((len(m.path) for m in result.modules), default=6)
        per_module.add_column("module", min_width=min(widest, 40), overflow="fold")
        for column in ("status", "rank", "change", "gate cosine", "identical"):
            per_module.add_column(column, no_wrap=True)
        for m in result.modules:
            same = [
                name
                for name, flag in (
                    ("lora_A", m.identical.lora_a),
                    ("lora_B", m.identical.lora_b),
                    ("gate", m.identical.gate),
                )
                if flag
            ]
            per_module.add_row(
                escape(m.path),
                m.status,
                f"{_num(m.rank_a)} -> {_num(m.rank_b)}",
                _num(m.relative_change),
                _num(m.gate_cosine),
                ", ".join(same) or "-",
            )
        out.print(per_module)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
