"""Host RAM of each FSDP rank while the model loads and shards: the whole fp32 UNet read by every rank, then
sharded (before), against the UNet built on the meta device and each rank reading its own rows (after).

    flock /tmp/bigmem.lock .venv/bin/python bench/fsdp_memory.py [--model FOLDER] [--ranks 2]

A random-weight SD1.5-architecture diffusers folder (`sdtune.toy.random_pipeline`, 860 M UNet, ~4.3 GB,
built once into --workdir, ~1 min) is loaded by `torchrun --nproc-per-node N` over gloo on the CPU, each
rank running what `sdtune train` runs before its first step (`load_for_training`, then `place`, which
shards the UNet under `memory.distributed=fsdp`), once with `meta_unet=False` (the load before issue 30)
and once with `meta_unet=True`. Each rank reports its peak RSS (`ru_maxrss`), its RSS before the load
(torch and diffusers imported) and after the shards are in place. The other parts (VAE, text encoder)
are loaded whole by every rank in both. Needs ~10 GB of host RAM at 2 ranks (run it under the lock).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import save_results

GIB = 2**30
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(model: str, meta: bool) -> None:
    """One rank (under torchrun): load and place the model as a run does; rank 0 prints every rank's figures."""
    import diffusers  # noqa: F401  (imported before "RSS before load": the load's own memory only)
    import torch
    import transformers  # noqa: F401

    from sdtune.config import load_config
    from sdtune.family.scratch import load_for_training
    from sdtune.plan import resolve_plan
    from sdtune.train.placement import place
    from sdtune.util.world import World

    torch.set_num_threads(1)
    cfg, info = load_config("cpu", ["memory.distributed=fsdp", f"model.pretrained={model}"])
    world = World.from_env()
    plan = resolve_plan(cfg, preset=info, world=world)
    world.start(plan.device)
    before, started = rss(), time.perf_counter()
    components = load_for_training(cfg.model, cfg.train.seed, cfg.train, meta_unet=meta)
    placement = place(components, plan, cfg)
    seconds = time.perf_counter() - started
    held = sum(p.to_local().numel() for p in placement.unet.parameters()) * 4
    mine = {"before_load": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "after_shard": rss(), "unet_shard": held, "seconds": seconds}
    everyone = world.gather(mine)
    if world.main:
        print(json.dumps(everyone))
    world.stop()


def run(model: Path, ranks: int, meta: bool) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               __file__, "--child", str(model), *(["--meta"] if meta else [])]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=Path(__file__).parent)
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a diffusers folder (default: a random SD1.5 one in --workdir)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--meta", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.meta)
    model = Path(args.model) if args.model else Path(args.workdir or tempfile.mkdtemp()) / "sd15-random"
    if not (model / "model_index.json").is_file():
        from sdtune.toy.random_pipeline import build_random_pipeline

        started = time.time()
        build_random_pipeline("sd15", model)
        print(f"random SD1.5 pipeline built in {time.time() - started:.0f} s", flush=True)
    rows = {"whole UNet per rank, then sharded (before)": run(model, args.ranks, meta=False),
            "meta device, each rank its rows (after)": run(model, args.ranks, meta=True)}
    print(f"| load ({args.ranks} ranks, gloo, SD1.5 UNet fp32) | rank | RSS before load | peak RSS | "
          "RSS after sharding | UNet shard | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, ranks in rows.items():
        for rank, r in enumerate(ranks):
            print(f"| {name} | {rank} | {r['before_load'] / GIB:.2f} GiB | {r['peak'] / GIB:.2f} GiB | "
                  f"{r['after_shard'] / GIB:.2f} GiB | {r['unet_shard'] / GIB:.2f} GiB | {r['seconds']:.1f} |")
    peaks = {name: sum(r["peak"] for r in ranks) for name, ranks in rows.items()}
    before, after = peaks.values()
    print(f"node peak (sum over ranks): {before / GIB:.2f} GiB before, {after / GIB:.2f} GiB after "
          f"({after / before:.2f}x)")
    print(f"results: {save_results('fsdp_memory', rows)}")


if __name__ == "__main__":
    main()
