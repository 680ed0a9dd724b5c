"""sdtune-tiny: a small Stable Diffusion model pretrained by sdtune itself on the world of `shapes`.

    make tiny-model            # or: python -m sdtune.toy.tiny --out sdtune/assets/sdtune-tiny

Nothing can be downloaded where sdtune is developed, and a randomly initialised model cannot show
whether fine-tuning is right, so sdtune ships this one. It has the SD architecture (AutoencoderKL, CLIP
text encoder and BPE tokenizer, UNet2DConditionModel, DDIM scheduler) at 64x64 pixels, and is built in
three seeded stages:

1. the tokenizer spells every word of the caption language as one token; the text encoder keeps its
   random initialisation (frozen, as in fine-tuning: its job is only to tell the words apart);
2. the VAE is trained to reconstruct rendered shapes (its own short loop: a VAE is not what sdtune
   fine-tunes), and its latent scaling factor is measured, as SD's was;
3. the UNet is pretrained from scratch by sdtune's own run (`sdtune.run.attempt`, the code path every
   fine-tune takes) on rendered images of circles, squares and triangles with captions.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sdtune.toy import shapes

logger = logging.getLogger(__name__)

ASSET = Path(__file__).parent.parent / "assets" / "sdtune-tiny"
MAX_TOKENS = 16  # "a yellow triangle on the black background" is 9 tokens with start and end


def architecture(seed: int = 0) -> dict:
    """Randomly initialised sdtune-tiny parts: 16x16x4 latents for 64 px images."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.toy.tokenizer import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tiny_tokenizer(tmp, words=shapes.WORDS, max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(32, 64, 64), sample_size=shapes.SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    unet = UNet2DConditionModel(
        sample_size=shapes.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def render_batch(count: int, rng: random.Random, specs: list[shapes.Spec]):
    """`count` rendered images of random specs as a [count, 3, 64, 64] tensor in [-1, 1]."""
    import numpy as np
    import torch

    arrays = [np.asarray(shapes.render(rng.choice(specs), rng), dtype=np.float32) for _ in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(vae, steps: int, batch: int, seed: int) -> float:
    """Fit the VAE to rendered shapes (MSE plus a light KL term); return the final reconstruction MSE."""
    import torch

    rng, specs = random.Random(seed), shapes.all_specs(shapes.SHAPES)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        x = render_batch(batch, rng, specs)
        posterior = vae.encode(x).latent_dist
        mse = (vae.decode(posterior.sample()).sample - x).pow(2).mean()
        (mse + 1e-6 * posterior.kl().mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info(f"vae step {step + 1}/{steps}: reconstruction mse {mse.item():.5f}")
    vae.eval()
    return mse.item()


def measure_scaling_factor(vae, seed: int) -> float:
    """1 / std of the latents, so the diffusion model sees unit-variance inputs (SD's 0.18215, measured)."""
    import torch

    with torch.no_grad():
        x = render_batch(256, random.Random(seed), shapes.all_specs(shapes.SHAPES))
        return float(1.0 / vae.encode(x).latent_dist.sample().std())


def write_dataset(folder: Path, count: int, seed: int, specs: list[shapes.Spec]) -> Path:
    """`count` rendered PNGs with `.txt` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        spec = rng.choice(specs)
        shapes.render(spec, rng).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(spec.caption)
    return folder


def pretrain(out: Path, *, vae_steps: int, unet_steps: int, images: int, seed: int = 0) -> Path:
    """All three stages; writes the diffusers folder `out` (without checkpoints or single file)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdtune.config import load_config
    from sdtune.run import attempt

    parts = architecture(seed)
    started = time.perf_counter()
    train_vae(parts["vae"], vae_steps, batch=8, seed=seed)
    parts["vae"].register_to_config(scaling_factor=measure_scaling_factor(parts["vae"], seed + 1))
    scaling = parts["vae"].config.scaling_factor
    logger.info(f"vae trained in {time.perf_counter() - started:.0f} s; scaling factor {scaling:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(work / "base")
        data = write_dataset(work / "data", images, seed + 2, shapes.all_specs(shapes.BASE_SHAPES))
        cfg, info = load_config("cpu", [
            f"model.pretrained={work / 'base'}", f"train.max_steps={unet_steps}", "train.batch_size=16",
            "train.learning_rate=1e-3", "train.lr_scheduler=cosine", f"train.lr_warmup_steps={min(200, unet_steps)}",
            "train.snr_gamma=5.0", "data.caption_dropout=0.1", f"train.seed={seed}", "train.weight_decay=0.0",
            "output.checkpoint_every=0", "output.single_file=false",
        ])
        torch.manual_seed(seed)
        summary = attempt(cfg, info, data, work / "run", progress=lambda total, _: _EveryHundred(total))
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(work / "run", out, ignore=shutil.ignore_patterns(
            "checkpoints", "summary.json", "config.toml", "metrics.jsonl", "logs"))
    logger.info(f"sdtune-tiny written to {out} in {time.perf_counter() - started:.0f} s "
                f"(unet {summary['seconds']:.0f} s, final loss {summary['final_loss']:.4f})")
    return out


class _EveryHundred:
    """A metrics sink that logs one line every 100 steps (the pretraining takes an hour)."""

    def __init__(self, total: int):
        self.total = total

    def log(self, record) -> None:
        if record.step % 100 == 0:
            logger.info(f"unet step {record.step}/{self.total}: loss {record.loss:.4f}, "
                        f"{record.seconds_per_step:.2f} s/step")

    def image(self, tag: str, step: int, image) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description="Pretrain sdtune-tiny from scratch (seeded, CPU).")
    parser.add_argument("--out", type=Path, default=ASSET, help="where the diffusers folder goes")
    parser.add_argument("--vae-steps", type=int, default=800, help="VAE training steps (batch 8)")
    parser.add_argument("--unet-steps", type=int, default=8000, help="UNet pretraining steps (batch 16)")
    parser.add_argument("--images", type=int, default=4000, help="rendered training images for the UNet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # as print() showed them
    pretrain(args.out, vae_steps=args.vae_steps, unet_steps=args.unet_steps, images=args.images, seed=args.seed)


if __name__ == "__main__":
    main()
