"""Peak host RAM of a fresh run against the same run resumed, for each optimizer-offload tier.

    .venv/bin/python bench/resume_memory.py [--width 0.5] [--tiers none,cpu,nvme,cpu+ema] [--dir /tmp]

A pipeline with an SD1.5-architecture UNet of `--width` times its channels (0.5: 211 M parameters; the
tiny text encoder and VAE, so that the UNet and its optimizer state are what counts) trains on the CPU
with the `cpu` preset (fp32, 64 px, batch 1) and `memory.optimizer_offload` = none, cpu and nvme, and cpu
with `train.ema_decay` (the moving average in the tier's host RAM, checkpointed as `ema.safetensors`). Per tier,
two child processes run the real trainer (`trainer.prepare` + `trainer.loop`): "fresh" trains 2 steps and
writes its checkpoint; "resumed" loads that checkpoint (`--resume`), trains 2 more and writes its own. Each
child's peak resident set size (`VmHWM`) is its own; the goal is resumed <= fresh + 5%, since resuming
must fit wherever training fits. The children run with glibc's mmap threshold fixed at 1 MiB, as in
`offload_tiers.py`, so that RSS shows what is held rather than what the allocator keeps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import save_results

TIERS = ("none", "cpu", "nvme", "cpu+ema")  # +ema: with train.ema_decay, the average checkpointed too
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
GOAL = 1.05  # resumed peak / fresh peak


def build_model(folder: Path, width: float) -> int:
    """A diffusers folder: SD1.5's UNet at `width` of its channels beside the tiny text encoder and VAE;
    returns the UNet's parameter count."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from support.testing import tiny_components

    from sdtune.family import archs

    parts = tiny_components()
    config = archs.unet_config("sd15")
    config.update(block_out_channels=[int(c * width) for c in config["block_out_channels"]], sample_size=8,
                  cross_attention_dim=parts["text_encoder"].config.hidden_size)
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel.from_config(config)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in parts["unet"].parameters())


def child(tier: str, model: str, data: str, out: str, offload_dir: str, resume: bool) -> dict:
    import torch

    from sdtune.config import load_config
    from sdtune.train import loop as trainer

    torch.set_num_threads(1)
    offload, _, ema = tier.partition("+")
    sets = [f"model.pretrained={model}", "train.batch_size=1", "output.checkpoint_every=2",
            f"train.max_steps={4 if resume else 2}", f"memory.optimizer_offload={offload}"]
    if ema:
        sets.append("train.ema_decay=0.999")
    if offload == "nvme":
        sets.append(f"memory.offload_dir={offload_dir}")
    cfg, info = load_config("cpu", sets)
    messages = _Lines()
    logging.getLogger("sdtune").addHandler(messages)
    logging.getLogger("sdtune").setLevel(logging.INFO)
    with trainer.prepare(cfg, info, data, out, resume=resume) as run:
        trainer.loop(run)
    messages = messages.lines
    if resume and not any(m.startswith("resumed from") for m in messages):
        raise SystemExit(f"the run did not resume: {messages}")
    return {"tier": tier, "resumed": resume, "peak_rss_bytes": _status("VmHWM"), "steps": run.step}


class _Lines(logging.Handler):
    """sdtune's log lines, kept to check that the run resumed."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (`ru_maxrss` is the same peak, in KiB, where /proc is missing)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, **MALLOC})
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.5, help="fraction of SD1.5's UNet channels")
    parser.add_argument("--tiers", default=",".join(TIERS), help="comma-separated, from " + ",".join(TIERS))
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the model, runs and state file go")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tier, model, data, out, offload_dir, resume = args.child
        print(json.dumps(child(tier, model, data, out, offload_dir, resume == "resume")))
        return
    from support.testing import make_image_folder

    work = Path(tempfile.mkdtemp(prefix="resume-memory-", dir=args.dir))
    try:
        params = build_model(work / "model", args.width)
        data = make_image_folder(work / "images", count=4)
        rows = []
        for tier in args.tiers.split(","):
            out = work / f"out-{tier}"
            common = (tier, str(work / "model"), str(data), str(out), str(work))
            fresh, resumed = run_child(*common, "fresh"), run_child(*common, "resume")
            rows.append({"tier": tier, "fresh_peak_rss_bytes": fresh["peak_rss_bytes"],
                         "resumed_peak_rss_bytes": resumed["peak_rss_bytes"],
                         "resumed_vs_fresh": resumed["peak_rss_bytes"] / fresh["peak_rss_bytes"]})
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"SD1.5 UNet at {args.width:g} of its channels ({params / 1e6:.0f} M parameters), fp32 on the CPU, "
          f"one process per run; goal: resumed <= fresh x {GOAL}")
    print(f"{'tier':8s} {'fresh':>10s} {'resumed':>10s} {'resumed/fresh':>14s}")
    for row in rows:
        verdict = "ok" if row["resumed_vs_fresh"] <= GOAL else "OVER"
        print(f"{row['tier']:8s} {row['fresh_peak_rss_bytes'] / 2**30:6.2f} GiB "
              f"{row['resumed_peak_rss_bytes'] / 2**30:6.2f} GiB {row['resumed_vs_fresh']:14.3f}  {verdict}")
    save_results("resume_memory", {"params": params, "width": args.width, "rows": rows})


if __name__ == "__main__":
    main()
