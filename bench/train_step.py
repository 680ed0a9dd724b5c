"""Training step time: sdtune under each preset's levers against a plain loop as the diffusers example trains.

    .venv/bin/python bench/train_step.py [--steps 8] [--repeats 3] [--batch-size 4]

Same model (the bundled sdtune-tiny), same images (64 px), same batch size and number of steps, on the
CPU with one thread. The baseline is written here the way diffusers' `train_text_to_image.py` trains:
AdamW (fused) on the device over the fp32 UNet, autocast for the forward, the VAE and text encoder in the
mixed-precision dtype and run every step, gradient clipping, no offload, no checkpointing. sdtune runs
its real trainer (`trainer.prepare` + `loop`) with the levers of each preset moved to the CPU
(`memory.device=cpu`; `attention` is SDPA). Each row runs `--repeats` times, alternating with the
baseline of the same precision; s/step is the mean over a run's steps after the first, and the table
gives min / median / max over the repeats and the ratio of the medians (baseline / sdtune: above 1 is
faster than the baseline).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from _common import save_results, step_bench_setup, trainer_step_times

from sdtune.config import load_config

PLANS = {  # row: (preset, extra overrides, baseline precision)
    "cpu preset (fp32)": ("cpu", [], "fp32"),
    "rtx3050 levers (bf16, checkpointing, cpu offload)": ("rtx3050", [], "bf16"),
    "rtx4090 levers (bf16, fused AdamW)": ("rtx4090", [], "bf16"),
    "rtx3050 + weights streamed": ("rtx3050", ["memory.param_offload=cpu"], "bf16"),
}
COMMON = ["model.pretrained=sdtune-tiny", "memory.device=cpu", "memory.attention=sdpa", "data.resolution=64",
          "train.gradient_accumulation_steps=1", "train.lr_warmup_steps=0", "output.checkpoint_every=0"]


def sdtune_step(preset: str, sets: list[str], data: Path, out: Path, steps: int, batch: int) -> float:
    cfg, info = load_config(preset, [*COMMON, *sets, f"train.max_steps={steps}", f"train.batch_size={batch}"])
    return statistics.mean(trainer_step_times(cfg, info, data, out))


def baseline_step(precision: str, data: Path, steps: int, batch: int) -> float:
    """The diffusers text-to-image example's loop, reduced to its memory and compute essentials."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from sdtune.data import BatchStream, scan_folder
    from sdtune.family.load import load_components

    c = load_components("sdtune-tiny")
    cfg, _ = load_config("cpu", ["data.resolution=64"])
    stream = BatchStream(scan_folder(data, cfg.data).examples, cfg.data, batch, seed=0)
    noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # the example's frozen-model dtype
    c.vae.requires_grad_(False).to(dtype=weight_dtype)
    c.text_encoder.requires_grad_(False).to(dtype=weight_dtype)
    c.unet.train()
    optimizer = torch.optim.AdamW(c.unet.parameters(), lr=1e-5, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for step in range(steps):
        started = time.perf_counter()
        items = stream.items(step)
        pixels, captions = stream.pixels(items), [item.caption for item in items]
        with torch.no_grad():
            latents = c.vae.encode(pixels.to(weight_dtype)).latent_dist.sample().float() * c.vae.config.scaling_factor
            ids = c.tokenizer(captions, padding="max_length", max_length=c.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
            text = c.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            prediction = c.unet(noisy, timesteps, text).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(c.unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return statistics.mean(times[1:])


def main() -> None:
    args, tmp, data = step_bench_setup(batch_size=4)
    rows, run = {}, 0
    for name, (preset, sets, precision) in PLANS.items():
        ours, theirs = [], []
        for _ in range(args.repeats):
            run += 1
            theirs.append(baseline_step(precision, data, args.steps, args.batch_size))
            ours.append(sdtune_step(preset, sets, data, tmp / f"out{run}", args.steps, args.batch_size))
        rows[name] = {"sdtune_s": [min(ours), statistics.median(ours), max(ours)],
                      "baseline_s": [min(theirs), statistics.median(theirs), max(theirs)],
                      "speed_vs_baseline": statistics.median(theirs) / statistics.median(ours)}
    print(f"sdtune-tiny, 64 px, batch {args.batch_size}, {args.steps} steps, {args.repeats} repeats, one thread")
    print("| plan | sdtune s/step (min / median / max) | baseline s/step | speed vs baseline |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        ours, theirs = row["sdtune_s"], row["baseline_s"]
        print(f"| {name} | {ours[0]:.3f} / {ours[1]:.3f} / {ours[2]:.3f} | {theirs[0]:.3f} / {theirs[1]:.3f} / "
              f"{theirs[2]:.3f} | {row['speed_vs_baseline']:.2f}x |")
    save_results("train_step", rows)


if __name__ == "__main__":
    main()
