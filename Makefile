# sdtune tasks. `make demo` to see it work; `make install` once, then `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast test-gpu gpu-check lint demo tiny-model bench docs

install: $(VENV)/.installed

# torch first, pinned to the CPU build on this machine's disk, so that the project's plain `torch>=2.4`
# finds it satisfied instead of pulling a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Two workers (pytest-xdist), one thread each: the tests are single-threaded, and the machine has 2 cores.
# `make test` is everything (what CI and README run): tests/unit, e2e (CLI runs of the tiny models, the
# estimator at full size), multiprocess (torchrun, signals) and gpu (skipped without CUDA). `make test-fast`
# is the inner loop, tests/unit alone, under 90 s. Both print the 30 slowest, so a slow test is seen.
PYTEST := $(PY) -m pytest -q -n 2 --dist worksteal --durations=30
test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) tests/unit

# On a CUDA machine: the async copies against synchronous ones and the estimate against what torch reserved;
# then every plan under its card's cap (`bench/gpu_plans.py --budget SECONDS`).
test-gpu: install
	$(PY) -m pytest -q -m gpu tests/gpu

# Both as one budgeted run, most valuable rows first (`make gpu-check BUDGET=520`; bench/gpu_check.py).
BUDGET ?= 520
gpu-check: install
	$(PY) bench/gpu_check.py --budget $(BUDGET)

lint: install
	$(VENV)/bin/ruff check sdtune tests bench

# The generated references, docs/reference/config.md and cli.md, from the config dataclasses and the Typer app
# (tests/unit/test_docs.py fails when they are stale).
docs: install
	$(PY) docs/generate.py

# Every CPU benchmark, one after another (about 21 minutes on 2 cores): each prints its table; all of them
# go to bench/results/bench.md, and each script's figures to bench/results/NAME.json.
BENCHES := offload_step nvme_stream offload_tiers offload_unet resume_memory train_step lora_step estimate_speed estimate_check data_throughput large_folder distributed_step
bench: install
	mkdir -p bench/results
	set -o pipefail; for b in $(BENCHES); do echo "## bench/$$b.py"; $(PY) bench/$$b.py || exit 1; echo; done \
		| tee bench/results/bench.md

# Fine-tune the bundled sdtune-tiny on examples/star and print the concept score before and after.
demo: install
	$(PY) examples/demo.py

# Pretrain sdtune-tiny from scratch (seeded; about half an hour on 2 CPU cores) into the package.
tiny-model: install
	$(PY) -m sdtune.toy.tiny --out sdtune/assets/sdtune-tiny
