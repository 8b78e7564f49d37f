"""Evaluations: jobs (a release x a benchmark spec) leased by workers, and their results."""
