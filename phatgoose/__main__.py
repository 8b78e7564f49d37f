"""`python -m phatgoose`: the same command line as the `phatgoose` script."""

from phatgoose.cli import app

app()
