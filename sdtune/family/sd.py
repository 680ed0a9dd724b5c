"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, whose last hidden states are the UNet's context.

SD 1.x uses OpenAI's CLIP ViT-L/14 and SD 2.x OpenCLIP ViT-H (its diffusers text encoder already stops at
the penultimate layer), both as a transformers `CLIPTextModel`; the UNet takes no added conditioning.
"""

from __future__ import annotations

from sdtune.family.base import Components, Conditioning, Family


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

    def encode(self, components, captions: list[str], grad: bool = False) -> Conditioning:
        tokens = tokenize(components.tokenizer, captions, next(components.text_encoder.parameters()).device)
        return self.encode_tokens(components.text_encoders, [tokens], grad)

    def encode_tokens(self, encoders, tokens, grad: bool = False) -> Conditioning:
        import torch

        with torch.set_grad_enabled(grad):
            return Conditioning(hidden=encoders[0](tokens[0])[0])


def tokenize(tokenizer, captions: list[str], device):
    """Token ids padded to the tokenizer's full length (77), as the pipelines encode prompts (a multi-vector
    embedding's word spelled out as its tokens, `spelled_out`)."""
    from sdtune.family.clip_tokenizer import spelled_out

    captions = [spelled_out(tokenizer, caption) for caption in captions]
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


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
