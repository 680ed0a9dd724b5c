#!/bin/bash
# Build the ComfyUI environment that bench/client_adapters.py runs ComfyUI's own loaders in.
# Usage: bash bench/comfy_venv.sh DIR COMFYUI_SOURCE
#   DIR            where the venv goes (DIR/venv) with DIR/stubs (a stand-in torchvision)
#   COMFYUI_SOURCE a checkout of github.com/Comfy-Org/ComfyUI (measured at a125cd84)
# ComfyUI's requirements are installed minus torchvision (its wheels need another torch than this machine's
# CPU torch 2.13.0); the model loaders import torchvision at module level but never call it for SD models,
# so an empty package stands in. pip resolves torchaudio to a release built for another torch (2.11.1 beside
# 2.13.0): ComfyUI then logs "torchaudio missing" (its audio models only). Run ComfyUI code with --cpu and
# PYTHONPATH=COMFYUI_SOURCE:DIR/stubs.
set -euo pipefail
dir=$1 src=$2
python3 -m venv "$dir/venv"
grep -v -E '^(torchvision|torch|torchaudio)$|^#|^$' "$src/requirements.txt" > "$dir/requirements.txt"
"$dir/venv/bin/python" -m pip install -q torch==2.13.0 torchaudio
"$dir/venv/bin/python" -m pip install -q -r "$dir/requirements.txt" torch==2.13.0
mkdir -p "$dir/stubs/torchvision"
for m in __init__ transforms io ops models; do
  echo '"""A stand-in for torchvision: imported by ComfyUI modules that SD loading never calls."""' \
    > "$dir/stubs/torchvision/$m.py"
done
"$dir/venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
