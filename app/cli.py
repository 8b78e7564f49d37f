"""The `phatgoose` command line: one entry point that mounts each package's commands.

This is the one module that assembles the packages (docs/design.md): the library, the
client and the coordinator never import it.
"""

import typer

from app.demo import demo
from benchmarks.cli import app as bench_app
from client.cli import app as client_app
from coordinator.cli import app as coordinator_app

app = typer.Typer(
    help="PHATGOOSE platform: train experts, run a coordinator, build routed releases, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(client_app, name="client", help="Contributors: train, inspect and publish experts.")
app.add_typer(
    coordinator_app,
    name="coordinator",
    help="Run the coordinator service and manage its catalog.",
)
app.add_typer(bench_app, name="bench", help="Benchmarks: zero-shot quality and routing cost.")
app.command("demo")(demo)
