"""memory.compile=blocks against the uncompiled UNet, side by side in one process: s/step, compile time, loss
difference (issue 30, item 4).

    .venv/bin/python bench/compile_blocks.py [--steps 6] [--mid-steps 3] [--threads 1] [--warm-cache]

Two UNets with random weights: the tests' tiny SD1 UNet (64 px, batch 2) and a mid-size one, SD1.5's
architecture (sdtune/family/archs/sd15) with every channel count halved (220 M parameters, 3.2 GB peak
RSS with both copies; 256 px, batch 1). Each model is copied; one copy goes through `compile_blocks` (what
memory.compile=blocks runs, with inductor), and the two train on the same inputs, their steps interleaved
(forward, backward, SGD: no optimizer state, so both copies fit), gradient checkpointing on as the presets
have it. The first compiled step pays the compile: the table gives dynamo's compile seconds, the first
step's wall, the median s/step of the later steps of each copy, the ratio (above 1: compiled is faster)
and the largest relative loss difference over the steps. Inductor's caches go to a new empty folder
(what a first run pays) unless --warm-cache keeps its usual one (what a later run of the same shapes pays).
On a GPU the plan bench measures it through `--set memory.compile=blocks` (bench/gpu_plans.py).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import statistics
import tempfile
import time

import torch
from _common import save_results

from sdtune.family.archs import unet_config
from sdtune.train.compile import compile_blocks


def tiny_unet():
    from support.testing import tiny_components

    return tiny_components()["unet"], (2, 8, 32)  # batch, latent side, text width


def mid_unet():
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet_config("sd15").items() if not k.startswith("_")}
    config["block_out_channels"] = [c // 2 for c in config["block_out_channels"]]
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config), (1, 32, config["cross_attention_dim"])


def _step(unet, inputs) -> float:
    latents, timesteps, text, target = inputs
    loss = torch.nn.functional.mse_loss(unet(latents, timesteps, text).sample, target)
    loss.backward()
    with torch.no_grad():
        for p in unet.parameters():
            p -= 1e-4 * p.grad
            p.grad = None
    return loss.item()


def _inputs(shape, step: int):
    batch, side, width = shape
    g = torch.Generator().manual_seed(step)
    return (torch.randn(batch, 4, side, side, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 77, width, generator=g), torch.randn(batch, 4, side, side, generator=g))


def measure(name: str, build, steps: int) -> dict:
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch._dynamo.reset()
    eager, shape = build()
    for unet in (eager,):
        unet.set_attn_processor(AttnProcessor2_0())
        unet.enable_gradient_checkpointing()
        unet.train()
    compiled = copy.deepcopy(eager)
    blocks = compile_blocks(compiled)
    times, losses = {"eager": [], "compiled": []}, {"eager": [], "compiled": []}
    for step in range(steps + 1):
        inputs = _inputs(shape, step)
        for label, unet in (("compiled", compiled), ("eager", eager)) if step % 2 else (("eager", eager),
                                                                                         ("compiled", compiled)):
            started = time.perf_counter()
            losses[label].append(_step(unet, inputs))
            times[label].append(time.perf_counter() - started)
    graphs, seconds = blocks.compiled()
    eager_s, compiled_s = statistics.median(times["eager"][1:]), statistics.median(times["compiled"][1:])
    difference = max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"], strict=True))
    return {"model": name, "params_m": sum(p.numel() for p in eager.parameters()) / 1e6, "blocks": blocks.blocks,
            "graphs": graphs, "compile_s": seconds, "first_step_s": times["compiled"][0], "eager_s": eager_s,
            "compiled_s": compiled_s, "ratio": eager_s / compiled_s, "loss_rel_diff": difference}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mid-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-mid", action="store_true")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's usual cache folder")
    args = parser.parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile-blocks-")
        atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    torch.set_num_threads(args.threads)
    rows = [measure("tiny SD1", tiny_unet, args.steps)]
    if not args.skip_mid:
        rows.append(measure("SD1.5 / 2 channels", mid_unet, args.mid_steps))
    cache = "warm" if args.warm_cache else "cold"
    print(f"torch {torch.__version__}, {args.threads} thread(s), inductor ({cache} cache), gradient checkpointing on")
    print("| model | params (M) | blocks (graphs) | compile s | first step s | eager s/step | compiled s/step "
          "| eager/compiled | loss rel. diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['params_m']:.0f} | {r['blocks']} ({r['graphs']}) | {r['compile_s']:.1f} | "
              f"{r['first_step_s']:.1f} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | {r['ratio']:.2f}x | "
              f"{r['loss_rel_diff']:.1e} |")
    print(f"results: {save_results('compile_blocks', rows)}")


if __name__ == "__main__":
    main()
