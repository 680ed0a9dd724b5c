"""The file a textual-inversion run writes (`train.method = "embedding"`), and how `sdtune sample` loads one:
`embedding.safetensors`, in the layout AUTOMATIC1111, Forge and ComfyUI read from their `embeddings/` folder
and diffusers' `load_textual_inversion` reads too:

- SD 1.x / 2.x: `emb_params`, [vectors, 768] (CLIP-L) or [vectors, 1024] (OpenCLIP-H);
- SDXL: `clip_l` [vectors, 768] and `clip_g` [vectors, 1280], one per text encoder.

The vectors are fp32 (each client casts them to its own precision; a file of a few KB). The metadata holds the
word (`modelspec.trigger_phrase`, which `sdtune sample --embedding` reads), the vector count, the base model
and the steps, with the Stability model-spec keys kohya's scripts write for a textual inversion. A1111 and
ComfyUI name the embedding by its file name (`embedding:NAME` in ComfyUI), not by the word it was trained on.

    save_embedding(modules, family, out_dir, embedding_metadata(cfg, components, steps=500))
    token_of("embedding.safetensors")   # "<sks>", or None for a file without the metadata
    load_embeddings(pipe, family, ["embedding.safetensors"], tokens=[])   # `sdtune sample --embedding`
"""

from __future__ import annotations

from pathlib import Path

from sdtune.util.files import save_safetensors

EMBEDDING_FILE = "embedding.safetensors"
TOKEN_KEY = "modelspec.trigger_phrase"


def embedding_tensors(modules: dict, family) -> dict:
    """{file key: fp32 [vectors, width] on the CPU} of the trained vectors (`sdtune.train.embedding`), each
    text encoder under its family's key (`emb_params`; `clip_l`, `clip_g`)."""
    from sdtune.train.embedding import vectors

    trained = vectors(modules)
    return {key: trained[name].detach().float().cpu().contiguous()
            for key, name in zip(family.embedding_keys, trained, strict=True)}


def save_embedding(modules: dict, family, out_dir: Path, metadata: dict[str, str], name: str = EMBEDDING_FILE) -> Path:
    path = Path(out_dir) / name
    save_safetensors(embedding_tensors(modules, family), path, metadata=metadata)
    return path


def embedding_metadata(cfg, components, steps: int) -> dict[str, str]:
    """The word, its vector count, the base model and the steps; the model-spec keys of a textual inversion."""
    family, unet = components.family, components.unet
    v2 = unet.config.cross_attention_dim == 1024  # SD 2.x's OpenCLIP-H width (a toy model is v1's kind)
    specs = family.kohya_model_spec  # architecture -> (kohya's base version, the model-spec's "<arch>/lora")
    base, architecture = specs.get("sd21" if v2 else "sd15") or next(iter(specs.values()))
    embedding, resolution = cfg.embedding, cfg.data.resolution
    values = {
        TOKEN_KEY: embedding.token, "sdtune.vectors": embedding.vectors, "sdtune.init_text": embedding.init_text,
        "ss_sd_model_name": Path(cfg.model.pretrained).name or cfg.model.pretrained, "ss_base_model_version": base,
        "ss_steps": steps, "ss_training_comment": "trained with sdtune", "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture.replace("/lora", "/textual-inversion"),
        "modelspec.implementation": family.model_spec_implementation,
        "modelspec.title": f"sdtune embedding {embedding.token}", "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": components.prediction_type,
    }
    return {key: str(value) for key, value in values.items()}


def token_of(path: str | Path) -> str | None:
    """The word an embedding file was trained on, from its metadata (None without it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return (file.metadata() or {}).get(TOKEN_KEY) or None


def is_embedding_folder(folder: str | Path) -> bool:
    """A textual-inversion run's --out: its `embedding.safetensors` beside the `config.toml` naming its base."""
    folder = Path(folder)
    return ((folder / EMBEDDING_FILE).is_file() and (folder / "config.toml").is_file()
            and not (folder / "model_index.json").is_file())


def load_embeddings(pipe, family, files: list[str | Path], tokens: list[str]) -> list[str]:
    """Load each embedding file onto `pipe` (of model `family`) through diffusers' own `load_textual_inversion`,
    each vector set into its text encoder (SDXL: `clip_l` into the first, `clip_g` into the second, as diffusers'
    docs do): the word is `tokens[i]`, else the file's own (`token_of`), else its name, as AUTOMATIC1111 names
    it. Returns the words."""
    from safetensors.torch import load_file

    from sdtune.errors import SdtuneError
    from sdtune.family.base import TEXT_ENCODER_NAMES

    words, keys = [], family.embedding_keys
    for i, path in enumerate(files):
        if not Path(path).is_file():
            raise SdtuneError(f"--embedding {path} does not exist: pass an embedding .safetensors file")
        tensors = load_file(str(path))
        word = (tokens[i] if i < len(tokens) else None) or token_of(path) or Path(path).stem
        fits = all(key in tensors for key in keys) if len(keys) > 1 else len(tensors) == 1  # SD: any one tensor
        if not fits:
            raise SdtuneError(f"--embedding {path} holds {', '.join(sorted(tensors))}, where a {family.name} model's "
                              f"embedding holds {' and '.join(keys)}: it was trained for another model family")
        values = [tensors[key] for key in keys] if len(keys) > 1 else list(tensors.values())
        for value, encoder in zip(values, TEXT_ENCODER_NAMES, strict=False):
            tokenizer = encoder.replace("text_encoder", "tokenizer")
            try:
                pipe.load_textual_inversion(value, token=word, text_encoder=getattr(pipe, encoder),
                                            tokenizer=getattr(pipe, tokenizer))
            except (ValueError, RuntimeError) as exc:
                raise SdtuneError(f"--embedding {path} does not load onto this model: {exc}") from None
        words.append(word)
    return words
