"""Pipelines of a bundled architecture with random weights, where no real weights can be downloaded
(benchmarks, GPU checks): the same shapes, memory and speed as the published model, meaningless images.

    build_random_pipeline("sd15", "rand-sd15")  # a diffusers folder with random fp32 weights (~4 GB)

    random_single_file("sd15", "sd15.safetensors")   # the same as one original-layout file, as model sites share

The tokenizers are CLIP's real ones (`sdtune.family.clip_tokenizer`) unless `tokenizer_from` names a folder
that holds another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.family import archs


def _tokenizer(tokenizer_from: str | Path | None, text_config: dict) -> Any:
    from transformers import CLIPTokenizer

    from sdtune.family.clip_tokenizer import clip_tokenizer, pad_token

    if tokenizer_from is None:
        tokenizer = clip_tokenizer(pad_token(text_config.get("hidden_act", "")))
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

    from sdtune.util.libraries import quiet_libraries

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


def random_single_file(name: str, path: str | Path, *, seed: int = 0, dtype: str = "float16",
                       prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> Path:
    """Write a single-file checkpoint of architecture `name` in the original layout, as model sites share
    them, with random weights: every tensor drawn from N(0, 0.02) (seconds, where diffusers' own
    initialisation of SD1.5 takes a minute on 2 cores), built and written in `dtype` (SDXL in fp16 needs
    about 7 GB of RAM); `prediction_type` v_prediction adds the `v_pred` key (and `zero_terminal_snr` the
    `ztsnr` key). Meaningless images; the same keys, shapes and loading path as a real checkpoint."""
    import torch

    from sdtune.export.single_file import write_single_file

    index = archs.read_json(archs.arch_dir(name) / "model_index.json")
    built = {}
    generator = torch.Generator().manual_seed(seed)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if isinstance(index.get(part), list) and index[part][0]:
            module = archs.build_model(name, part, "meta").to(getattr(torch, dtype)).to_empty(device="cpu")
            with torch.no_grad():
                for tensor in module.parameters():
                    tensor.normal_(0.0, 0.02, generator=generator)
                for key, buffer in module.named_buffers():  # to_empty left them uninitialised
                    if key.endswith("position_ids"):
                        buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
                    elif buffer.is_floating_point():
                        buffer.zero_()
            built[part] = module
    encoders = [built[part] for part in ("text_encoder", "text_encoder_2") if part in built]
    written = write_single_file(path, unet=built["unet"], vae=built["vae"], text_encoders=encoders,
                                prediction_type=prediction_type, dtype=getattr(torch, dtype),
                                zero_terminal_snr=zero_terminal_snr)
    if written.path is None:
        raise SdtuneError(f"could not write {name} as a single file: {written.reason}")
    return written.path
