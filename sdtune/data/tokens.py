"""Captions longer than the text encoder reads: counted, and one of them shown where it is cut.

A CLIP text encoder reads 77 tokens, its start and end tokens included (sdtune-tiny's reads 16), or with
`data.max_token_length` 150/225 that many in windows (152, 227); whatever follows is dropped, so the tail
of a long caption never trains. `sdtune train` and `sdtune data check` say how many captions that happens
to, with one example. Each distinct caption is tokenized once, in batches, and only when it has more bytes
than the limit (a token covers at least one byte of the lower-cased text), so a folder of short captions
costs nothing.

    tokenizer, source = model_tokenizer(cfg.model)          # without loading the model
    cut = cut_captions([(e.image, e.caption) for e in scan.examples], tokenizer, cfg.data.max_token_length)
    if cut.count:
        print(cut.line())   # "3 of 40 captions are longer than the 77 tokens ... e.g. a.png (94 tokens): ..."
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

BATCH = 1024  # captions a tokenizer call


@dataclass(frozen=True)
class CutCaptions:
    count: int         # images whose caption is cut
    total: int         # images checked
    limit: int         # tokens the text encoder reads, start and end included
    example: str = ""  # one image, its caption's length, what is read last and what is cut first

    def line(self) -> str:
        return (f"{self.count:,} of {self.total:,} captions are longer than the {self.limit} tokens the text encoder "
                f"reads (its start and end tokens included): the rest is cut and never trained; e.g. {self.example}")


def shortest(tokenizers) -> object:
    """The tokenizer that reads the fewest tokens (SDXL's two read 77 each)."""
    return min(tokenizers, key=lambda tokenizer: tokenizer.model_max_length)


def cut_captions(examples: list[tuple[Path, str]], tokenizer, max_token_length: int = 75) -> CutCaptions:
    """How many of `examples` (image, caption) have a caption cut by `tokenizer` read to `max_token_length`
    (`data.max_token_length`: 75, or 150/225 in windows: 152/227 tokens with the start and end), and the first."""
    from sdtune.family.base import TextReading

    limit = TextReading(max_token_length).tokens_read(tokenizer.model_max_length)
    images: dict[str, list[Path]] = {}
    for image, caption in examples:
        images.setdefault(caption, []).append(image)
    long = [caption for caption in images if len(unicodedata.normalize("NFC", caption.lower()).encode()) + 2 > limit]
    cut: dict[str, int] = {}
    for start in range(0, len(long), BATCH):
        batch = long[start:start + BATCH]
        ids = tokenizer(batch, truncation=False, verbose=False)["input_ids"]  # verbose: no "longer than" warning
        cut.update((caption, len(i)) for caption, i in zip(batch, ids, strict=True) if len(i) > limit)
    if not cut:
        return CutCaptions(0, len(examples), limit)
    caption = next(caption for _, caption in examples if caption in cut)  # the first, in the scan's order
    read, lost = _cut_at(tokenizer, caption, limit)
    example = (f'{images[caption][0].name} ({cut[caption]} tokens): "{_tail(read)}" | cut: "{_head(lost)}"')
    return CutCaptions(sum(len(images[c]) for c in cut), len(examples), limit, example)


def _cut_at(tokenizer, caption: str, limit: int) -> tuple[str, str]:
    """(the text read, the text cut) of `caption`: split at the first token that does not fit, in the
    caption's own letters where the tokenizer gives offsets, else as the tokenizer decodes it."""
    try:
        offsets = tokenizer(caption, truncation=False, verbose=False, return_offsets_mapping=True)["offset_mapping"]
        start = offsets[limit - 1][0]  # tokens 1 .. limit-2 are read, between the start and end tokens
        return caption[:start], caption[start:]
    except (NotImplementedError, KeyError, TypeError):  # a tokenizer without offsets
        ids = tokenizer(caption, truncation=False, verbose=False)["input_ids"]
        return tokenizer.decode(ids[1:limit - 1]), tokenizer.decode(ids[limit - 1:-1])


def _tail(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else "..." + text[-width:]


def _head(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width] + "..."


def model_tokenizer(model) -> tuple[object, str]:
    """(the tokenizer that reads captions for `model` (a `ModelConfig`), which one) without loading the
    model: a diffusers folder's own (sdtune-tiny's reads 16 tokens), or a single file's `model.config`
    folder's; otherwise CLIP's, bundled with sdtune: every Stable Diffusion text encoder reads 77 tokens of
    its vocabulary, so the count is the same as with the model's own."""
    from sdtune.family.clip_tokenizer import clip_tokenizer
    from sdtune.family.load import classify_source, resolve_source, single_file_configs

    kind = classify_source(model.pretrained)
    folder = None
    if kind == "folder":
        folder = Path(resolve_source(model.pretrained))
    elif kind == "single_file":  # its configs' folder: the bundled ones hold no tokenizer
        folder = single_file_configs(model.pretrained, model.config)[1]
    names = sorted(p.name for p in folder.glob("tokenizer*") if p.is_dir()) if folder is not None else []
    if not names:
        return clip_tokenizer(), "CLIP's tokenizer (bundled)"
    from transformers import CLIPTokenizer  # every SD tokenizer is one; AutoTokenizer would import torch

    tokenizer = shortest([CLIPTokenizer.from_pretrained(folder / name) for name in names])
    return tokenizer, f"{model.pretrained}'s tokenizer"
