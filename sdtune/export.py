"""Write the result of a run: a diffusers pipeline folder, and the run's summary as JSON.

The folder is what `StableDiffusionPipeline.from_pretrained(out)` loads with no sdtune code: the
trained UNet (fp32 master weights) beside the base model's VAE, text encoder, tokenizer and scheduler,
all in safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SUMMARY = "summary.json"


def export_pipeline(components, out_dir: Path) -> Path:
    from sdtune.models import assemble_pipeline

    assemble_pipeline(components).save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def write_json(path: Path, payload: dict) -> Path:
    """Write JSON under a temporary name and rename it, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
