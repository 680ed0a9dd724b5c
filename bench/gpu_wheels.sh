#!/usr/bin/env bash
# The packages sdtune needs that a CUDA machine with only torch (and no registry to reach) lacks or holds in
# another version, as Python 3.12 x86-64 wheels in .whl/ (git-ignored through .git/info/exclude), at the
# versions of this checkout's venv; and the commit, for bench/gpu_check.py's versions row. Run it here, then
# carry .whl to the GPU machine (bench/README.md, "GPU checks"). About 22 MB.
#
#   bench/gpu_wheels.sh                 # PY=/path/to/python to read the versions from another venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EXCLUDE=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
# diffusers and importlib_metadata are missing there; transformers (5.23: pyproject), peft, regex and typer
# may be older than sdtune's floors. torch, tokenizers, huggingface_hub, safetensors, accelerate are used as found.
PACKAGES=(diffusers transformers peft importlib_metadata regex typer)
PINNED=$("$PY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' \
    "${PACKAGES[@]}")
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $PINNED
git rev-parse --short HEAD > .whl/commit
ls -l .whl && du -sh .whl
