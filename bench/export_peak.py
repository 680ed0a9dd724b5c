"""Issue 30 item 6: the export's peak resident set against the training's, for full-size SD1.5 and SDXL.

    flock /tmp/bigmem.lock env PYTHONPATH=$PWD .venv/bin/python bench/export_peak.py \\
        [--arch sd15 sdxl] [--trees main=/path/to/main export=.] [--work DIR] [--keep]

Per architecture: a random-weight single file of the published full-size model (`sdtune.toy.random_pipeline`,
fp16, as model sites share them), then, per source tree (`--trees NAME=PATH`, default this one), one
`sdtune train` run of 1 step at 64 px on 2 images in a fresh subprocess whose resident set is split into its
phases: `load` (`sdtune.train.loop.prepare`: the model read, cast and placed, the optimizer built), `train`
(the loop), `export` (`sdtune.export.run_output.export_run` up to its first write: the training state let go,
the trained weights cast to output.save_precision) and `write` (`sdtune.export.export_pipeline` on: the
diffusers folder, model.safetensors, summary.json). The kernel's high-water mark (VmHWM) is reset at each
boundary (`/proc/self/clear_refs` 5), so each phase's peak is its own; a phase starts at the resident set the
last one left (the export at the training's, all of its state still held). `write/train` is the figure: what
writing the model needs beside what training needed. SD1.5 trains with torch AdamW in fp32 (weights, gradients
and both moments held: what the export has to free); SDXL with Adafactor stepped inside backward, bf16 frozen
parts and activation checkpointing, which is what fits in 24 GB. Each run's folder is deleted right after it
(7-20 GB), the model files at the end unless --keep. Prints one row per (arch, tree) and writes
bench/results/export_peak.json. Run it alone, under the big-memory lock: SDXL's rows reach ~17.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import save_results

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
COMMON = ("data.resolution=64", "train.batch_size=1", "train.max_steps=1", "output.checkpoint_every=0",
          "output.keep_checkpoints=0")
PHASES = ("load", "train", "export", "write")
ARCH_SETS = {
    "sd15": ("memory.optimizer=adamw",),
    "sdxl": ("memory.optimizer=adafactor", "memory.fused_backward=true", "train.max_grad_norm=0",
             "memory.precision=bf16", "memory.gradient_checkpointing=true"),
}


def _hwm_reset() -> int:
    """The resident set's high-water mark in bytes since the last reset; then reset it to the current RSS."""
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    Path("/proc/self/clear_refs").write_text("5")
    return kib * 1024


def child(spec: dict) -> None:
    """One run under `spec`, its phases' peaks and seconds printed as the last line (JSON)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import sdtune.export
    from sdtune.config import load_config
    from sdtune.export import run_output
    from sdtune.run import attempt
    from sdtune.train import loop as trainer

    phases: dict[str, dict] = {}
    clock = {"phase": "start", "since": time.perf_counter()}

    def enter(name: str) -> None:
        peak, now = _hwm_reset(), time.perf_counter()
        phases[clock["phase"]] = {"peak_rss_bytes": peak, "seconds": round(now - clock["since"], 1)}
        clock.update(phase=name, since=now)
        print(f"{clock['phase']} after {peak / GIB:.2f} GiB peak", file=sys.stderr, flush=True)  # where a kill hit

    def phase(name: str, function):
        def wrapped(*args, **kwargs):
            enter(name)
            return function(*args, **kwargs)
        return wrapped

    trainer.prepare = phase("load", trainer.prepare)
    trainer.loop = phase("train", trainer.loop)
    run_output.export_run = phase("export", run_output.export_run)
    sdtune.export.export_pipeline = phase("write", sdtune.export.export_pipeline)  # the training state let go
    cfg, info = load_config("cpu", spec["overrides"])
    summary = attempt(cfg, info, Path(spec["data"]), Path(spec["out"]))
    enter("done")
    phases.pop("start", None)
    print(json.dumps({"phases": phases, "single_file": summary.get("single_file")}))


def _line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['arch']:5} {row['tree']:8} {row['status']}"
    phases = [row["phases"].get(name, {}) for name in PHASES]
    peaks = " ".join(f"{phase.get('peak_rss_bytes', 0) / GIB:9.2f}" for phase in phases)
    times = " ".join(f"{phase.get('seconds', 0):7.0f}" for phase in phases)
    ratio = phases[3].get("peak_rss_bytes", 0) / phases[1]["peak_rss_bytes"]
    return f"{row['arch']:5} {row['tree']:8} {peaks} {ratio:10.2f}x {times}"


def _run(arch: str, tree: str, path: Path, model: Path, images: Path, work: Path) -> dict:
    out = work / f"out-{arch}-{tree}"
    sets = [f"model.pretrained={model}", *COMMON, *ARCH_SETS[arch], f"data.cache_dir={work / 'cache'}"]
    spec = {"overrides": sets, "data": str(images), "out": str(out)}
    env = {**os.environ, "PYTHONPATH": str(path)}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],  # sdtune from `path`
                          capture_output=True, text=True, cwd=ROOT / "bench", env=env)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    row = {"arch": arch, "tree": tree, "status": "ok"}
    if done.returncode:
        row["status"] = f"error (exit {done.returncode}): " + " | ".join(done.stderr.strip().splitlines()[-3:])
        return row
    return {**row, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=sorted(ARCH_SETS))
    parser.add_argument("--trees", nargs="+", default=[f"this={ROOT}"], help="NAME=PATH of sdtune source trees")
    parser.add_argument("--work", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from support.testing import make_image_folder

    from sdtune.toy.random_pipeline import random_single_file

    work = Path(args.work or tempfile.mkdtemp(prefix="sdtune-export-peak-"))
    images = make_image_folder(work / "images", count=2, size=64)
    trees = [(name, Path(path).resolve()) for name, _, path in (tree.partition("=") for tree in args.trees)]
    print("peak RSS per phase, GiB (load: model read and placed; train: 1 step at 64 px; export: from the loop's end "
          "to the first write, the training state still there at its start; write: the folder and the single file)\n"
          "arch  tree          load     train    export     write write/train  load s train s export s write s",
          flush=True)
    rows = []
    for arch in args.arch:
        model = work / f"{arch}-random.safetensors"
        if not model.is_file():
            random_single_file(arch, model)
        for name, path in trees:
            rows.append(_run(arch, name, path, model, images, work))
            print(_line(rows[-1]), flush=True)
        if not args.keep:
            model.unlink()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {save_results('export_peak', rows)}")


if __name__ == "__main__":
    main()
