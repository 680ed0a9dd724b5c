"""CLIP's tokenizer without a download: built from the byte-pair merges bundled in `sdtune/assets/clip/`.

A single-file checkpoint from a model site holds the text encoders' weights but no tokenizer, and the
tokenizer folders of a diffusers model are a download. Every text encoder of Stable Diffusion (OpenAI's
CLIP ViT-L/14 for SD 1.x and SDXL's first, OpenCLIP ViT-H for SD 2.x, OpenCLIP ViT-bigG for SDXL's second)
uses the same vocabulary of 49,408 tokens; they differ only in the token that pads a caption to 77.

    tokenizer = clip_tokenizer("<|endoftext|>")   # SD 1.x, SDXL's first encoder (CLIP_L_PAD)
    tokenizer = clip_tokenizer("!")               # SD 2.x, SDXL's second encoder (OPEN_CLIP_PAD, id 0)
    tokenizer = clip_tokenizer(pad_token(encoder.config.hidden_act))   # the one an encoder was published with
    tokenizer("a photo of a cat").input_ids       # [49406, 320, 1125, 539, 320, 2368, 49407]
    spelled_out(tokenizer, "a photo of <sks> dog")  # "a photo of <sks> <sks>_1 dog": a 2-vector embedding's tokens

The vocabulary is built as OpenAI's reference tokenizer (`clip/simple_tokenizer.py`) builds it: the 256
byte symbols, the same with the end-of-word mark `</w>`, one token per merge in order, then
`<|startoftext|>` (49406) and `<|endoftext|>` (49407). The merges file is OpenAI's (MIT licence, in
`assets/clip/LICENSE`), cut to the 48,894 merges CLIP uses. The tokenizer itself is transformers'
`CLIPTokenizer` (lower case, whitespace collapsed, byte-level BPE), the class diffusers' pipelines hold.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

MERGES = Path(__file__).resolve().parent.parent / "assets" / "clip" / "merges.txt.gz"
CLIP_L_PAD = "<|endoftext|>"  # openai/clip-vit-large-patch14's pad token: SD 1.x, SDXL's tokenizer
OPEN_CLIP_PAD = "!"           # OpenCLIP's (id 0): SD 2.x's tokenizer, SDXL's tokenizer_2
MAX_LENGTH = 77               # tokens a CLIP text encoder reads, start and end included
VOCAB_SIZE = 49408


def byte_symbols() -> list[str]:
    """The byte-level BPE alphabet (GPT-2's and CLIP's): printable bytes as themselves, the rest shifted
    past 255, in byte order as OpenAI's `bytes_to_unicode` lists them (printable first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]


@lru_cache(maxsize=1)
def vocabulary() -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges as "a b" lines) of CLIP's tokenizer."""
    lines = gzip.decompress(MERGES.read_bytes()).decode("utf-8").splitlines()
    merges = [line for line in lines[1:] if line]  # past the "#version" header
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = CLIP_L_PAD):
    """A transformers `CLIPTokenizer` with CLIP's vocabulary, padding with `pad_token`."""
    from transformers import CLIPTokenizer

    vocab, merges = vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token,
                         model_max_length=MAX_LENGTH)


def pad_token(hidden_act: str) -> str:
    """The pad token of the published tokenizer of a text encoder with activation `hidden_act`: CLIP ViT-L's
    (quick_gelu, SD 1.x and SDXL's first) pads with `<|endoftext|>`, the OpenCLIP encoders (gelu) with "!"."""
    return CLIP_L_PAD if hidden_act == "quick_gelu" else OPEN_CLIP_PAD


def spelled_out(tokenizer, caption: str) -> str:
    """`caption` with each word a tokenizer was taught for a multi-vector textual inversion (`<sks>`, with
    `<sks>_1`, `<sks>_2`, ... beside it) written as all of its tokens (`<sks> <sks>_1 <sks>_2`), exactly as
    diffusers' pipelines rewrite a prompt for a loaded embedding (`TextualInversionLoaderMixin.maybe_convert_prompt`):
    training captions and sample prompts then read the same tokens."""
    added = tokenizer.added_tokens_encoder
    if not any(f"{token}_1" in added for token in added):  # nothing to spell out: most runs
        return caption
    for token in set(tokenizer.tokenize(caption)):
        if token in added and f"{token}_1" in added:
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            caption = caption.replace(token, " ".join([token, *(f"{token}_{i}" for i in range(1, count))]))
    return caption
