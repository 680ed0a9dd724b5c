"""The text encoder and tokenizer files of an exported diffusers folder in the layout every client reads:
transformers 4.x and 5.x, diffusers old and new, ComfyUI's DiffusersLoader.

transformers 5 saves a `CLIPTextModel` without its `text_model.` level when the model was not loaded from
a file that had it (a single-file checkpoint, a model built in memory): transformers 4.x then loads that
file as random weights with only a warning, and ComfyUI finds no CLIP in it. transformers 5 loads the
prefixed keys as well (its conversion mapping removes the prefix), so the prefixed layout is the one both
read. Its tokenizer folder holds only `tokenizer.json`, which transformers 4.x's `CLIPTokenizer` (the
class diffusers' pipelines name, a pure-Python tokenizer there) cannot build from: it reads `vocab.json`
and `merges.txt`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TEXT_PREFIX = "text_model."
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"


def write_client_layout(components: dict, out: Path) -> None:
    """Rewrite what `pipeline.save_pretrained(out)` wrote for `components` (the pipeline's parts by name)
    into the layout every client reads."""
    from transformers import CLIPTextModel, PreTrainedTokenizerBase

    for name, module in components.items():
        if isinstance(module, CLIPTextModel) and (Path(out) / name / "model.safetensors").is_file():
            prefix_text_model(Path(out) / name / "model.safetensors")
        elif isinstance(module, PreTrainedTokenizerBase):
            write_vocabulary_files(module, Path(out) / name)


def text_model_names(module, weights: dict) -> dict:
    """`weights` named relative to `module` (a LoRA's, say), with the `text_model.` level transformers 4.x
    gives a `CLIPTextModel`'s names where transformers 5 dropped it: diffusers >= 0.41 strips it again for a
    flattened model, transformers 5's `load_adapter` (diffusers 0.39, 0.40) converts it, 4.x needs it."""
    from transformers import CLIPTextModel

    if isinstance(module, CLIPTextModel) and not hasattr(module, "text_model"):
        return {TEXT_PREFIX + key: value for key, value in weights.items()}
    return weights


def prefix_text_model(path: Path) -> None:
    """Give every key of a `CLIPTextModel` safetensors file the `text_model.` prefix that transformers 4.x
    wrote, unless it has it. Only the header changes: the tensor bytes are copied as they are (no copy of
    the weights in memory, whatever their dtype). transformers 5 never shards a text encoder (its shards
    are 50 GB), so the one file is the whole model."""
    with open(path, "rb") as src:
        header = json.loads(src.read(int.from_bytes(src.read(8), "little")))
        if any(key.startswith(TEXT_PREFIX) for key in header if key != "__metadata__"):
            return
        renamed = {key if key == "__metadata__" else TEXT_PREFIX + key: value for key, value in header.items()}
        raw = json.dumps(renamed, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as dst:
                dst.write(len(raw).to_bytes(8, "little") + raw)
                shutil.copyfileobj(src, dst, 16 << 20)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_vocabulary_files(tokenizer, folder: Path) -> None:
    """`vocab.json`, `merges.txt` and `special_tokens_map.json` (and `added_tokens.json` for tokens past
    the vocabulary) beside `tokenizer.json`, as a transformers 4.x slow tokenizer saved them."""
    folder = Path(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # transformers 5's CLIPTokenizer, 4.x's CLIPTokenizerFast: the BPE model's own files
        backend.model.save(str(folder))
    else:  # a pure-Python tokenizer writes its own
        tokenizer.save_vocabulary(str(folder))
    specials = {key: str(value) for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    (folder / SPECIAL_TOKENS_MAP).write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    added = {token: index for token, index in tokenizer.get_added_vocab().items() if index >= tokenizer.vocab_size}
    if added:
        (folder / ADDED_TOKENS).write_text(json.dumps(added, indent=2, ensure_ascii=False) + "\n")
