"""LoRA training step time and what it keeps: sdtune's LoRA against diffusers' LoRA example loop, and
against sdtune's own full fine-tune.

    .venv/bin/python bench/lora_step.py [--steps 8] [--repeats 3] [--batch-size 8]

Same model (the bundled sdtune-tiny), same images (64 px), same batch and steps, on the CPU with one
thread, fp32. The baseline is written here as diffusers' `train_text_to_image_lora.py` trains: peft's
LoRA on the UNet's attention (`unet.add_adapter`), AdamW over the adapters, the VAE and text encoder run
every step, gradient clipping. sdtune runs its real trainer (`trainer.prepare` + `loop`) with
`train.method=lora` (rank 16, attention), and for reference the same run as a full fine-tune, with
`attention+conv` targets, with DreamBooth prior preservation (two forward/backward passes a step), and a
textual inversion (`train.method=embedding`: the frozen text encoder runs backward too).
s/step is the mean over a run's steps after the first; the table gives the median over the repeats and the
ratio baseline / sdtune (above 1 is faster), and the size of one checkpoint.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from _common import save_results, step_bench_setup, trainer_step_times
from support.testing import make_image_folder

from sdtune.config import load_config

COMMON = ["model.pretrained=sdtune-tiny", "memory.device=cpu", "memory.attention=sdpa", "data.resolution=64",
          "train.lr_warmup_steps=0", "train.learning_rate=1e-4"]
LORA = ["train.method=lora", "lora.rank=16"]
PLANS = {  # row: extra overrides
    "sdtune LoRA (rank 16, attention)": LORA,
    "sdtune LoRA, attention+conv": [*LORA, "lora.target=attention+conv"],
    "sdtune LoRA + prior preservation": [*LORA, "data.class_dir={class_dir}", "data.num_class_images=8"],
    "sdtune full fine-tune": [],
    # textual inversion: the text encoder runs forward and backward every step (the captions need not name the word)
    "sdtune textual inversion (2 vectors)": ["train.method=embedding", "embedding.token=<sks>", "embedding.vectors=2"],
}


def sdtune_step(sets: list[str], data: Path, out: Path, steps: int, batch: int) -> tuple[float, int]:
    cfg, info = load_config("cpu", [*COMMON, *sets, f"train.max_steps={steps}", f"train.batch_size={batch}",
                                    f"output.checkpoint_every={steps}"])
    seconds = statistics.mean(trainer_step_times(cfg, info, data, out))
    [checkpoint] = (out / "checkpoints").glob("step-*")
    return seconds, sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())


def baseline_step(data: Path, steps: int, batch: int) -> float:
    """diffusers' text-to-image LoRA example's loop, reduced to its compute essentials."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from sdtune.data import BatchStream, scan_folder
    from sdtune.family.load import load_components

    c = load_components("sdtune-tiny")
    cfg, _ = load_config("cpu", ["data.resolution=64"])
    stream = BatchStream(scan_folder(data, cfg.data).examples, cfg.data, batch, seed=0)
    noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
    for module in (c.unet, c.vae, c.text_encoder):
        module.requires_grad_(False)
    c.unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in c.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    c.unet.train()
    times = []
    for step in range(steps):
        started = time.perf_counter()
        items = stream.items(step)
        pixels, captions = stream.pixels(items), [item.caption for item in items]
        with torch.no_grad():
            latents = c.vae.encode(pixels).latent_dist.sample() * c.vae.config.scaling_factor
            ids = c.tokenizer(captions, padding="max_length", max_length=c.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
            text = c.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),))
        prediction = c.unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
        F.mse_loss(prediction.float(), noise.float()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return statistics.mean(times[1:])


def main() -> None:
    args, tmp, data = step_bench_setup(batch_size=8)
    class_dir = make_image_folder(tmp / "class", count=8)
    baseline = [baseline_step(data, args.steps, args.batch_size) for _ in range(args.repeats)]
    rows, run = {"diffusers LoRA example loop (baseline)": {"s_per_step": statistics.median(baseline)}}, 0
    for name, sets in PLANS.items():
        times, size = [], 0
        for _ in range(args.repeats):
            run += 1
            seconds, size = sdtune_step([s.format(class_dir=class_dir) for s in sets], data, tmp / f"out{run}",
                                        args.steps, args.batch_size)
            times.append(seconds)
        rows[name] = {"s_per_step": statistics.median(times), "checkpoint_bytes": size,
                      "speed_vs_baseline": statistics.median(baseline) / statistics.median(times)}
    print(f"sdtune-tiny, 64 px, batch {args.batch_size}, {args.steps} steps, {args.repeats} repeats, one thread, fp32")
    print("| run | s/step (median) | speed vs baseline | one checkpoint |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        ratio = f"{row['speed_vs_baseline']:.2f}x" if "speed_vs_baseline" in row else "1.00x"
        size = "-" if "checkpoint_bytes" not in row else (f"{row['checkpoint_bytes'] / 2**20:.1f} MiB"
                                                          if row["checkpoint_bytes"] >= 2**20
                                                          else f"{row['checkpoint_bytes'] / 2**10:.0f} KiB")
        print(f"| {name} | {row['s_per_step']:.3f} | {ratio} | {size} |")
    save_results("lora_step", rows)


if __name__ == "__main__":
    main()
