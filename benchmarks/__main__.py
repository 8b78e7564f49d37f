"""`python -m benchmarks`: the `phatgoose bench` commands, without the rest of the CLI (the
parallel runner starts its jobs this way, so benchmarks never depend on `app`)."""

from benchmarks.cli import app

app()
