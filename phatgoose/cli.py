"""The `phatgoose` command line: one entry point that mounts each package's commands.

This is the one module that assembles the packages; the library itself never imports the
client or the coordinator. Sub-commands are mounted only if their package provides them.
"""

import importlib

import typer

app = typer.Typer(
    help="PHATGOOSE platform: train experts, run a coordinator, build routed releases, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# (sub-command, module holding a Typer `app`, help)
_SUBCOMMANDS = [
    ("client", "client.cli", "Contributors: train, inspect and publish experts."),
    ("coordinator", "coordinator.cli", "Run the coordinator service and manage its catalog."),
    ("bench", "benchmarks.cli", "Benchmarks: zero-shot quality and routing cost."),
]


def _is_missing(error: ModuleNotFoundError, module: str) -> bool:
    """True when `module` itself (or a parent package) is absent, not one of its imports."""
    return error.name is not None and (module + ".").startswith(error.name + ".")


for _name, _module, _help in _SUBCOMMANDS:
    try:
        _sub = importlib.import_module(_module)
    except ModuleNotFoundError as error:
        if not _is_missing(error, _module):
            raise
        continue
    app.add_typer(_sub.app, name=_name, help=_help)

try:
    from coordinator.demo import demo as _demo
except ModuleNotFoundError as error:
    if not _is_missing(error, "coordinator.demo"):
        raise
else:
    app.command("demo")(_demo)
