"""The toy world's CLIP tokenizer: a real byte-level BPE tokenizer whose merges spell the shapes world's words
whole (any other text falls back to bytes). sdtune-tiny's recipe (`sdtune.toy.tiny`) and the tests' tiny
models (tests/support/testing.py) both use it.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtune.toy.shapes import WORDS


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiny_tokenizer(folder: str | Path, words=WORDS, max_length: int = 77):
    """A real CLIP BPE tokenizer whose merges spell out `words` whole; any other text falls back to bytes."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    known, merges = set(vocab), []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
                merges.append(f"{parts[0]} {parts[1]}")
            parts = [merged, *parts[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    raw = folder / "_bpe"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=max_length,
                              pad_token="<|endoftext|>")
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return tokenizer
