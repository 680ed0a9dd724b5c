"""Pipelines of a bundled architecture with random weights, where no real weights can be downloaded
(benchmarks, GPU checks): the same shapes, memory and speed as the published model, meaningless images.

    build_random_pipeline("sd15", "rand-sd15")  # a diffusers folder with random fp32 weights (~4 GB)

Its tokenizer is sdtune's tiny CLIP tokenizer (the real vocabulary is a download) unless `tokenizer_from`
names a folder that holds a real one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sdtune import archs
from sdtune.errors import SdtuneError


def _tokenizer(tokenizer_from: str | Path | None, text_config: dict) -> Any:
    from transformers import CLIPTokenizer

    from sdtune.toy.testing import write_tiny_tokenizer

    if tokenizer_from is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = write_tiny_tokenizer(tmp, max_length=text_config["max_position_embeddings"])
    else:
        folder = Path(tokenizer_from)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder)
    if len(tokenizer) > text_config["vocab_size"]:
        raise SdtuneError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder only "
                          f"{text_config['vocab_size']}; use a CLIP tokenizer")
    return tokenizer


def build_random_pipeline(name: str, folder: str | Path, *, seed: int = 0,
                          tokenizer_from: str | Path | None = None, device: str = "cpu") -> Path:
    """Write a diffusers pipeline folder of architecture `name` with randomly initialised fp32 weights
    (safetensors) that `StableDiffusionPipeline.from_pretrained(folder)` loads offline; returns `folder`.

    The weights are a function of `seed` and `device`; `device="cuda"` initialises them on the GPU, which
    is many times faster than the CPU's random number generator (SD1.5 takes ~50 s on 2 CPU cores)."""
    import diffusers
    import torch

    from sdtune.libraries import quiet_libraries

    if not (archs.arch_dir(name) / "model_index.json").is_file():
        raise SdtuneError(f"{name} ships only its UNet config (for counting and estimates), not a pipeline; "
                          f"random pipelines exist for {', '.join(archs.pipeline_archs())}")
    quiet_libraries()
    index = archs.read_json(archs.arch_dir(name) / "model_index.json")
    tokenizer = _tokenizer(tokenizer_from, archs.read_json(archs.arch_dir(name) / "text_encoder" / "config.json"))
    torch.manual_seed(seed)  # seeds the CUDA generators too
    modules: dict[str, Any] = {}
    for part, value in index.items():
        if part.startswith("_"):
            continue
        if not isinstance(value, list):  # a pipeline argument such as requires_safety_checker
            modules[part] = value
        elif value[0] is None:  # a part this architecture leaves out
            modules[part] = None
        elif value[1].endswith("Tokenizer"):
            modules[part] = tokenizer
        elif value[1].endswith("Scheduler"):
            cls = getattr(diffusers, value[1])
            modules[part] = cls.from_config(cls.load_config(archs.arch_dir(name) / part))
        else:
            modules[part] = archs.build_model(name, part, device).to("cpu")  # saved from host memory
    pipeline = getattr(diffusers, index["_class_name"])(**modules)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
