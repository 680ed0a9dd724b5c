"""ComfyUI's own checkpoint loader on a v-prediction single file: run in a ComfyUI environment
(bench/comfy_venv.sh), it imports no sdtune code. `bench/client_vpred.py` runs it; by hand:

    PYTHONPATH=COMFYUI:VENV_DIR/stubs VENV_DIR/venv/bin/python bench/comfy_vpred_check.py MODEL.safetensors

The file goes through `comfy.sd.load_checkpoint_guess_config` (the Load Checkpoint node) with the VAE and
text encoders left out (the detection reads the UNet's config and the marker keys only) and the UNet in the
file's fp16. Prints one JSON line: the model class ComfyUI chose, the `ModelType` it detected (EPS,
V_PREDICTION, ...), whether its sampling is zero terminal SNR (`ModelSamplingDiscrete.zsnr`) and the sigmas
at both ends of its schedule (with zsnr the last is ~4096, ComfyUI's stand-in for infinity; without ~14.6).
"""

from __future__ import annotations

import json
import sys

path = sys.argv[1]
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI's own argument parser: no GPU

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.sd  # noqa: E402
import torch  # noqa: E402

model, _, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False,
                                                        model_options={"dtype": torch.float16})
base = model.model
sampling = base.model_sampling
print(json.dumps({"file": path, "model_config": type(base.model_config).__name__, "model_type": base.model_type.name,
                  "zsnr": bool(getattr(sampling, "zsnr", False)), "sigma_min": round(float(sampling.sigma_min), 4),
                  "sigma_max": round(float(sampling.sigma_max), 2)}))
