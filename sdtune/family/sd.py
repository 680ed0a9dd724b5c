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
    """Token ids padded to the tokenizer's full length (77), as the pipelines encode prompts."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
