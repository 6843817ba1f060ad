# One-command tasks. `make test` is what CI runs (.ci/run) and what the README tells newcomers.
PY := .venv/bin/python
.PHONY: install serve proto proto-check lint fmt typecheck pytest test chart bench gpu-check

install:
	scripts/bootstrap.sh

# Flags for embed-serve go in ARGS: make serve ARGS="--http-port 8080"
serve:
	scripts/serve-default.sh $(ARGS)

proto: install
	$(PY) -m scripts.gen_proto

proto-check: install
	$(PY) -m scripts.gen_proto --check

fmt: install
	.venv/bin/ruff format bundle export service client tests bench scripts
	.venv/bin/ruff check --fix bundle export service client tests bench scripts

lint: install
	.venv/bin/ruff format --check bundle export service client tests bench scripts
	.venv/bin/ruff check bundle export service client tests bench scripts

typecheck: install
	.venv/bin/mypy

pytest: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: proto-check lint typecheck pytest

bench: install
	$(PY) -m bench $(BENCH_ARGS)

chart: install
	scripts/install-helm.sh
	$(PY) -m pytest -q tests/chart

gpu-check:
	python3 bench/gpu_check.py
