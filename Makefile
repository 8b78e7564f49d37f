# Everything runs inside .venv; `make demo` and `make test` create it on first use, from the
# lock: requirements/lock.txt pins every package (transitive ones included) with its hashes,
# requirements/torch.txt pins torch. docs/dependencies.md says how to change either.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt

.PHONY: setup demo test lint typecheck check lock upgrade

setup: $(STAMP)

# A new lock rebuilds the venv from nothing, so that no package outside the lock survives.
$(STAMP): pyproject.toml $(LOCK) requirements/torch.txt
	python3 -m venv --clear $(VENV)
	$(PY) -m pip install --quiet pip==26.3
	# torch first, on its own: on these machines pip takes the local CPU wheel for this pin.
	$(PY) -m pip install --quiet -r requirements/torch.txt
	# Then exactly the lock, every file checked against its hash.
	$(PY) -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
	# The project itself, built with the locked setuptools (no isolated build environment).
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) scripts/check_venv.py $(LOCK)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/phatgoose demo

test: setup
	$(PY) -m pytest -n auto --dist loadgroup

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# What CI runs (.ci/run), in one command.
check: lint typecheck test

# Re-resolve the lock after pyproject.toml changed, keeping every pin it can.
lock: setup
	scripts/lock

# The newest versions pyproject.toml allows, then a fresh venv from them and every check:
# drift is found here, not by users. Commit requirements/lock.txt once `make check` passes.
upgrade: setup
	scripts/lock --upgrade
	@git diff --unified=0 $(LOCK) | grep -E '^[-+][a-z0-9]' || echo "upgrade: no version changed"
	$(MAKE) check
