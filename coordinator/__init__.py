"""The coordinator service: expert catalog, releases, evaluations and the leaderboard.

One package per domain (`auth/`, `base_models/`, `experts/`, `releases/`, `evaluations/`),
each with its ORM models, service functions and routes; `core/` holds settings, the
database, logging and the app factory; `storage/` the content-addressed blob store.
"""
