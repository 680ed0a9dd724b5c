"""Tiny Stable Diffusion models and synthetic data, built from configs: no downloads, no GPU.

The tests and benchmarks share these builders (test support: not in the wheel). A tiny model has the real
architecture (the same UNet, VAE, CLIP text encoder(s), tokenizer and scheduler classes as SD 1.x / 2.x and
SDXL) at 64x64 pixels, so every code path that loads, trains, exports and samples a real model runs on it in
well under a second a step on one CPU thread.

    from support.testing import save_tiny_pipeline, make_image_folder   # tests/ on sys.path
    save_tiny_pipeline("tiny-sd", version=1)       # a diffusers folder: from_pretrained loads it
    save_tiny_sdxl_pipeline("tiny-sdxl")           # the same for StableDiffusionXLPipeline
    make_image_folder("images", count=8)           # PNGs with .txt captions
"""

from __future__ import annotations

import random
from pathlib import Path

from sdtune.toy.tokenizer import write_tiny_tokenizer

IMAGE_SIZE = 64


def tiny_components(version: int = 1, seed: int = 0, clip_vocab: bool = False) -> dict:
    """Randomly initialised SD-architecture parts; version 2 means v-prediction and linear projections;
    `clip_vocab`, CLIP's real tokenizer and a 49,408-row embedding table (a single file alone gets that
    tokenizer) instead of the tiny vocabulary."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.family.clip_tokenizer import clip_tokenizer, pad_token

    if clip_vocab:
        tokenizer = clip_tokenizer(pad_token("gelu" if version == 2 else "quick_gelu"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = write_tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    sd2 = version == 2
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 8, use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32), sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=32,
    ))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def save_tiny_pipeline(folder: str | Path, version: int = 1, seed: int = 0, clip_vocab: bool = False) -> Path:
    """Write a tiny diffusers pipeline folder that `StableDiffusionPipeline.from_pretrained` loads."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(version, seed, clip_vocab), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Randomly initialised SDXL-architecture parts: two CLIP text encoders (the second with a projection,
    whose pooled output joins the time embedding), a UNet with SDXL's `text_time` conditioning and a
    transformer depth that differs between levels, as SDXL's (1, 2, 10) does."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tiny_tokenizer(tmp)
    torch.manual_seed(seed)

    def encoder_config(act: str, width: int) -> CLIPTextConfig:  # two widths (as 768, 1280): loaders tell by it
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width + 5,
                              num_attention_heads=4,
                              num_hidden_layers=3, max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, hidden_act=act, projection_dim=32)

    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32 + 48,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32), sample_size=IMAGE_SIZE, scaling_factor=0.13025, force_upcast=True,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(encoder_config("quick_gelu", 32)),
            "text_encoder_2": CLIPTextModelWithProjection(encoder_config("gelu", 48)), "tokenizer": tokenizer,
            "tokenizer_2": tokenizer, "scheduler": scheduler}


def save_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny diffusers SDXL folder that `StableDiffusionXLPipeline.from_pretrained` loads."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**tiny_sdxl_components(seed)).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def make_image_folder(folder: str | Path, count: int = 8, seed: int = 0, captions: bool = True,
                      size: int = IMAGE_SIZE) -> Path:
    """`count` PNG images of coloured shapes, each with a `.txt` caption such as 'a red circle on the white
    background' (the language of `sdtune.toy.shapes`)."""
    from sdtune.toy import shapes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    specs = shapes.all_specs(shapes.BASE_SHAPES)
    for i in range(count):
        spec = rng.choice(specs)
        shapes.render(spec, rng, size).save(folder / f"img{i:03d}.png")
        if captions:
            (folder / f"img{i:03d}.txt").write_text(spec.caption)
    return folder
