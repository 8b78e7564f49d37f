"""`python -m app`: the same command line as the `phatgoose` script."""

from app.cli import app

app()
