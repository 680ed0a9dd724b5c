"""Write the result of a run: a diffusers pipeline folder, and the run's summary as JSON.

The folder is what the model family's pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`)
`.from_pretrained(out)` loads with no sdtune code: the trained UNet (in `output.save_precision`, fp16 by
default) beside the base model's VAE, text encoder(s), tokenizer(s) and scheduler, all in safetensors.
Beside it, `model.safetensors` holds the same model as one file (in `output.save_precision` too) in the
family's original layout (ldm for SD 1.x/2.x, sgm for SDXL) that A1111, ComfyUI and `from_single_file`
read, written only when those clients can read it (`sdtune.export.clients`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SINGLE_FILE = "model.safetensors"


def export_pipeline(components, out_dir: Path) -> Path:
    """The diffusers pipeline folder, every file of it readable as the umask allows (safetensors writes 0600),
    its text encoders and tokenizers in the layout transformers 4.x and ComfyUI read too
    (`sdtune.export.client_layout`)."""
    from sdtune.export.client_layout import write_client_layout
    from sdtune.family.load import assemble_pipeline
    from sdtune.util.files import follow_umask

    out, pipe = Path(out_dir), assemble_pipeline(components)
    pipe.save_pretrained(out, safe_serialization=True)
    write_client_layout(pipe.components, out)
    # only what save_pretrained wrote: a part's folder each, and model_index.json
    for part in [name for name, module in pipe.components.items() if module is not None] + ["model_index.json"]:
        if (out / part).exists():
            follow_umask(out / part)
    return out


def export_single_file(components, out_dir: Path, *, force: bool = False, name: str = SINGLE_FILE,
                       precision: str = "fp16"):
    """`model.safetensors` (or `name`) in the family's original layout, in `precision` (fp16, bf16, fp32),
    when ComfyUI and AUTOMATIC1111 can read it (`force`: anyway); a `sdtune.export.single_file.SingleFile` that says
    whether it was written, and why not."""
    from sdtune.export.single_file import write_single_file
    from sdtune.plan import torch_dtype

    return write_single_file(Path(out_dir) / name, unet=components.unet, vae=components.vae,
                             text_encoders=list(components.text_encoders),
                             prediction_type=components.prediction_type, dtype=torch_dtype(precision), force=force,
                             zero_terminal_snr=components.zero_terminal_snr)


def single_file_bytes(components, precision: str) -> int:
    """About what `export_single_file` writes in `precision`: every tensor of every part at that size."""
    from sdtune.plan import torch_dtype

    parts = (components.unet, components.vae, *components.text_encoders)
    return torch_dtype(precision).itemsize * sum(t.numel() for part in parts for t in part.state_dict().values())


def write_json(path: Path, payload: dict) -> Path:
    """Write JSON under a temporary name and rename it, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
