# sdtune tasks. `make demo` to see it work; `make install` once, then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint demo tiny-model gpu-wheels

install: $(VENV)/.installed

# torch first, pinned to the CPU build on this machine's disk, so that the project's plain `torch>=2.4`
# finds it satisfied instead of pulling a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check sdtune tests bench

# Fine-tune the bundled sdtune-tiny on examples/star and print the concept score before and after.
demo: install
	$(PY) examples/demo.py

# Pretrain sdtune-tiny from scratch (seeded; about half an hour on 2 CPU cores) into the package.
tiny-model: install
	$(PY) -m sdtune.tiny --out sdtune/assets/sdtune-tiny

# The wheels bench/gpu_check.py needs on the lent GPU machine, which has no diffusers and no network
# (see bench/README.md): into the git-ignored .whl/, which the device tool carries.
gpu-wheels: install
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		-d .whl diffusers==0.42.1
