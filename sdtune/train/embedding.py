"""Textual inversion (`train.method = "embedding"`): a new word, `embedding.token`, whose vectors are the only
weights that train; the text encoders, the UNet and the VAE stay frozen.

    modules = add_token(components, cfg.embedding, device)   # {"text_encoder": encoder, ...}: taught the word
    vectors(modules)          # {"text_encoder": [vectors, width] fp32, ...}: what a checkpoint and the file hold
    load_vectors(modules, saved)

Each tokenizer learns the word (with `vectors` > 1 also `<sks>_1`, `<sks>_2`, ..., the names diffusers'
`load_textual_inversion` gives them, which `sdtune.family.clip_tokenizer.spelled_out` writes out in every
caption and prompt), and each text encoder's token-embedding table is wrapped in `NewTokens`: the table
itself stays as it was, frozen in the working precision, and the word's vectors are an fp32 parameter of
their own. So the optimizer, weight decay, the EMA and checkpoints see those vectors and nothing else, and
every other weight stays bit-equal to the base model's. (diffusers' training script instead trains the whole
resized table and copies the old rows back after each step: the optimizer state of 49,408 rows, and weight
decay on all of them, for a few new ones.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sdtune.errors import SdtuneError
from sdtune.family.base import TEXT_ENCODER_NAMES

if TYPE_CHECKING:
    from sdtune.config import EmbeddingConfig

logger = logging.getLogger(__name__)


def _module():
    import torch

    class NewTokens(torch.nn.Module):
        """A token-embedding table and the new tokens' vectors: ids from `first` on read `vectors`."""

        def __init__(self, table: torch.nn.Embedding, vectors: torch.Tensor, first: int):
            super().__init__()
            self.table = table  # first: an encoder's dtype is its first parameter's (transformers)
            self.new = torch.nn.Embedding.from_pretrained(vectors, freeze=False)
            self.first = first

        @property
        def weight(self):  # what transformers and diffusers read of an input-embedding table
            return self.table.weight

        def forward(self, ids):
            new = ids >= self.first
            known = self.table(ids.masked_fill(new, 0))
            added = self.new((ids - self.first).clamp(0, self.new.num_embeddings - 1))
            return torch.where(new[..., None], added.to(known.dtype), known)

    return NewTokens


def token_names(token: str, count: int) -> list[str]:
    """The tokens a word of `count` vectors is written as: diffusers' names (`<sks>`, `<sks>_1`, ...)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def add_token(components, embedding: EmbeddingConfig, device: str) -> dict:
    """Teach every tokenizer `embedding.token` and give every text encoder its fp32 vectors on `device`
    (from `embedding.init_text`'s embeddings, or the mean of the table); the encoders by pipeline name.
    Meta-device parts (the estimator's, without tokenizers) get vectors of the right shape only."""
    import torch

    names = token_names(embedding.token, embedding.vectors)
    tokenizers = components.tokenizers  # none on the estimator's meta-device parts
    taught = set()
    for tokenizer in tokenizers:
        if id(tokenizer) not in taught:  # SDXL's two may be one object
            _teach(tokenizer, names)
            taught.add(id(tokenizer))
    NewTokens, modules = _module(), {}
    for n, (name, encoder) in enumerate(zip(TEXT_ENCODER_NAMES, components.text_encoders, strict=False)):
        table = encoder.get_input_embeddings()
        tokenizer = tokenizers[n] if tokenizers else None
        with torch.no_grad():
            start = _start(table, tokenizer, embedding, name)
        first = tokenizer.convert_tokens_to_ids(names[0]) if tokenizer is not None else table.num_embeddings
        encoder.set_input_embeddings(NewTokens(table, start.to(device, torch.float32), first))
        modules[name] = encoder
    return modules


def _teach(tokenizer, names: list[str]) -> None:
    """Add `names` to `tokenizer`; one line when it already knows one of them (a word of its vocabulary:
    its captions would not mean the new concept alone)."""
    vocabulary = tokenizer.get_vocab()
    known = [name for name in names if name in vocabulary or f"{name}</w>" in vocabulary]
    if known:
        raise SdtuneError(f"embedding.token={names[0]!r}: the tokenizer already knows {known[0]!r} (a word of its "
                          "vocabulary); choose a new word, e.g. --set embedding.token='<my-thing>'")
    tokenizer.add_tokens(names)


def _start(table, tokenizer, embedding: EmbeddingConfig, name: str):
    """The new vectors' first values, [vectors, width]: `init_text`'s token embeddings repeated or cut to
    `vectors`, or the mean of every row (said once)."""
    import torch

    count, weight = embedding.vectors, table.weight
    if weight.is_meta:
        return torch.empty(count, weight.shape[1], device="meta")
    ids = tokenizer(embedding.init_text, add_special_tokens=False).input_ids if embedding.init_text else []
    ids = [i for i in ids if i < table.num_embeddings]
    if not ids:
        if name == TEXT_ENCODER_NAMES[0]:
            logger.info(f"embedding.init_text is empty: the {count} vector{'s' if count > 1 else ''} of "
                        f"{embedding.token} start as the mean of every token's embedding")
        return weight.float().mean(0).repeat(count, 1)
    return weight[torch.tensor([ids[i % len(ids)] for i in range(count)])].float()


def vectors(modules: dict) -> dict:
    """The trained vectors of each text encoder, by pipeline name: fp32 [vectors, width], the tensors themselves."""
    return {name: encoder.get_input_embeddings().new.weight for name, encoder in modules.items()}


def load_vectors(modules: dict, saved: dict) -> None:
    import torch

    with torch.no_grad():
        for name, live in vectors(modules).items():
            live.copy_(saved[name])
