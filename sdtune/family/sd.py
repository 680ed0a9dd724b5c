"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, whose last hidden states are the UNet's context.

SD 1.x uses OpenAI's CLIP ViT-L/14 and SD 2.x OpenCLIP ViT-H (its diffusers text encoder already stops at
the penultimate layer), both as a transformers `CLIPTextModel`; the UNet takes no added conditioning.
Long captions (`data.max_token_length` 150, 225) and `train.clip_skip` read captions as kohya's sd-scripts
does (`tokenize`, `hidden_states`); at 75 and 1, exactly as the pipeline encodes a prompt.
"""

from __future__ import annotations

import logging

from sdtune.family.base import WINDOW, Components, Conditioning, Family

logger = logging.getLogger(__name__)


class StableDiffusion(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"

    def load_options(self) -> dict:
        return dict(safety_checker=None, requires_safety_checker=False)

    def components(self, pipe):
        return Components(unet=pipe.unet, vae=pipe.vae, text_encoders=(pipe.text_encoder,),
                          tokenizers=(pipe.tokenizer,), scheduler=pipe.scheduler, family=self)

    def assemble(self, components):
        return self.pipeline_type()(unet=components.unet, vae=components.vae, text_encoder=components.text_encoder,
                                    tokenizer=components.tokenizer, scheduler=components.scheduler,
                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def read_text(self, components, max_token_length: int = WINDOW, clip_skip: int = 1) -> None:
        super().read_text(components, max_token_length, clip_skip)
        if clip_skip > 1 and components.text_encoder.config.hidden_act == "gelu":  # OpenCLIP-H: SD 2.x
            logger.warning(f"train.clip_skip={clip_skip} on SD 2.x: its text encoder already ends one layer before "
                           "OpenCLIP's last, so this reads a layer further back (kohya warns the same)")

    def encode(self, components, captions: list[str], grad: bool = False) -> Conditioning:
        text = components.text
        tokens = tokenize(components.tokenizer, captions, next(components.text_encoder.parameters()).device,
                          text.windows)
        return self.encode_tokens(components.text_encoders, [tokens], grad, text.clip_skip)

    def encode_tokens(self, encoders, tokens, grad: bool = False, clip_skip: int = 1) -> Conditioning:
        import torch

        with torch.set_grad_enabled(grad):
            return Conditioning(hidden=hidden_states(encoders[0], tokens[0], clip_skip))


def tokenize(tokenizer, captions: list[str], device, windows: int = 1):
    """Token ids padded to the tokenizer's full length (77), as the pipelines encode prompts (a multi-vector
    embedding's word spelled out as its tokens, `spelled_out`); with several `windows` (long captions),
    `[B, windows, 77]`: the caption padded to windows x 75 + 2 tokens and cut into windows as kohya's
    `BaseDataset.get_input_ids` does (`_windows`)."""
    from sdtune.family.clip_tokenizer import spelled_out

    captions = [spelled_out(tokenizer, caption) for caption in captions]
    length = tokenizer.model_max_length
    ids = tokenizer(captions, padding="max_length", max_length=windows * (length - 2) + 2, truncation=True,
                    return_tensors="pt").input_ids
    if windows == 1:
        return ids.to(device)
    import torch

    return torch.stack([_windows(tokenizer, row, windows) for row in ids]).to(device)


def _windows(tokenizer, ids, count: int):
    """One caption's ids (`count` x 75 + 2 long) as `count` windows of 77: the start token, the next 75, and
    the caption's last token (EOS, or the pad). A tokenizer that pads with something else than EOS
    (OpenCLIP's "!": SD 2.x, SDXL's second) ends a window cut mid-caption with EOS, and starts an empty window
    with EOS: kohya's rules for "v2 or SDXL"."""
    import torch

    step, eos, pad = tokenizer.model_max_length - 2, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, count * step, step):
        chunk = torch.cat([ids[:1], ids[start:start + step], ids[-1:]])
        if pad != eos:
            if int(chunk[-2]) not in (eos, pad):
                chunk[-1] = eos
            if int(chunk[1]) == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return torch.stack(chunks)


def hidden_states(encoder, ids, clip_skip: int = 1):
    """`encoder`'s hidden states for `ids` (`[B, 77]` or `[B, windows, 77]`), as kohya's `get_hidden_states`:
    the encoder's output (its last layer through the final layer norm), or with `clip_skip` > 1 the layer
    `clip_skip` from the end through the final layer norm. Windows are encoded as one batch and `joined`."""
    flat = ids.reshape(-1, ids.shape[-1])
    if clip_skip == 1:
        hidden = encoder(flat)[0]
    else:  # transformers 5's CLIPTextModel holds the norm itself, 4's under text_model
        hidden = encoder(flat, output_hidden_states=True).hidden_states[-clip_skip]
        hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    return joined(hidden, ids)


def joined(hidden, ids):
    """The hidden states `[B x windows, 77, width]` of `ids` `[B, windows, 77]` as one caption's `[B, windows x 75
    + 2, width]` (kohya's "<BOS>...<EOS> の三連を <BOS>...<EOS> へ戻す"); unchanged for `[B, 77]` ids."""
    if ids.dim() == 2:
        return hidden
    import torch

    batch, windows, length = ids.shape
    hidden = hidden.reshape(batch, windows * length, hidden.shape[-1])
    middles = [hidden[:, k * length + 1:(k + 1) * length - 1] for k in range(windows)]
    return torch.cat([hidden[:, :1], *middles, hidden[:, -1:]], dim=1)


# What the single-file clients (ComfyUI, AUTOMATIC1111: ldm's layout) and kohya call this family's parts;
# `sdtune.family.load` tells a file's architecture by these and `sdtune.export` writes them.
StableDiffusion.single_file_text = {  # architecture -> where each text encoder's keys start in one file
    "sd15": ("cond_stage_model.transformer.",),  # ldm's FrozenCLIPEmbedder: OpenAI CLIP-L, transformers' layout
    "sd21": ("cond_stage_model.model.",),        # ldm's FrozenOpenCLIPEmbedder: OpenCLIP-H, its own layout
}
StableDiffusion.kohya_text_prefixes = ("lora_te_",)  # a kohya LoRA's text-encoder module names
StableDiffusion.kohya_sgm_names = False  # kohya names an SD UNet's LoRA modules as diffusers does
StableDiffusion.kohya_model_spec = {  # architecture -> (ss_base_model_version, modelspec.architecture)
    "sd15": ("sd_v1", "stable-diffusion-v1/lora"), "sd21": ("sd_v2", "stable-diffusion-v2-512/lora")}
StableDiffusion.model_spec_implementation = "diffusers"
StableDiffusion.embedding_keys = ("emb_params",)  # a textual inversion file's vectors (A1111, ComfyUI), per encoder
