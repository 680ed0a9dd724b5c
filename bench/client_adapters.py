"""Issue 28's must-show: every adapter file sdtune writes loads whole in ComfyUI's own loader, and the weights
ComfyUI patches in equal `sdtune merge`'s, on full-size SD1.5 and SDXL architectures.

    bash bench/comfy_venv.sh /tmp/comfy /path/to/ComfyUI       # once: ComfyUI's requirements in a venv
    PYTHONPATH=$PWD .venv/bin/python bench/client_adapters.py --comfy-env /tmp/comfy --comfyui /path/to/ComfyUI \\
        [--arch sd15 sdxl] [--rows lora locon ...] [--work DIR] [--keep]
    (or SDTUNE_COMFY_ENV / SDTUNE_COMFYUI in the environment for the two folders)

Per architecture: a random-weight single file of the full-size model (`sdtune.toy.random_pipeline`, fp16, as
model sites share them); per row (an algorithm and its `--set`s, `ROWS`) one `sdtune train` step at 64 px on
two images through the real command line, `sdtune merge` of the run, then bench/comfy_lora_check.py in the
ComfyUI environment (no sdtune code there): the base through ComfyUI's Load Checkpoint code, the run's
lora.safetensors through its LoraLoader code, the patched weights against the merged model.safetensors read
through the same loader. The learning rate is 0.1 so that one step changes the weights by far more than fp16
rounds them (the files are fp16). Prints one line per file: keys in the file, keys ComfyUI reported not
loaded, and per model part the keys patched, how many of them equal the merged ones in fp16 and how many fp16
steps (ulps) apart any weight is at most, the keys only the merge changed, and the largest |ComfyUI - merge|
relative to the largest change the adapter made beside the fp16 floor of that measure. Also the wall time and
peak RSS of each command. Results to bench/results/client_adapters.json. Each row's run and merged model are
deleted before the next, the base after the last, the work folder at the end, unless --keep.

Exits 1 when a file has keys ComfyUI did not load or a weight more than one fp16 step from the merge's.

Measured on the 2-core development VM (docs/benchmarks.md): SD1.5 7.6 min for the six rows, SDXL 22 min; peak
RSS, the mapped 7 GB model file included, of SDXL's training step 18.6 GiB, its merge 22 GiB, its ComfyUI check
13 GiB; disk ~21 GB at most (SDXL's base, a merged model and ComfyUI's view of it: 7 GB each). Run it alone.
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

from _common import comfy_arguments, save_results

REPO = Path(__file__).resolve().parents[1]
COMMON = ("train.method=lora", "train.learning_rate=0.1", "lora.text_encoder=true", "lora.rank=8", "lora.alpha=4",
          "lora.target=attention+conv")  # alpha != rank: a file whose scale is read wrong shows
ROWS = {  # row: its --set keys beyond COMMON (LoCon is LoRA with target=attention+conv)
    "lora": ("lora.target=attention",),
    "locon": ("lora.conv_rank=4", "lora.conv_alpha=8"),
    "loha": ("lora.algo=loha",),
    "lokr": ("lora.algo=lokr",),
    "lokr-r16": ("lora.algo=lokr", "lora.rank=16"),  # rank >= half a factor: layers with neither factor decomposed
    "dora": ("lora.dora=true",),
}
ARCH_SETS = {  # what keeps each architecture's training step in this machine's RAM
    "sd15": (),
    "sdxl": ("memory.precision=bf16", "memory.gradient_checkpointing=true"),
}


def timed(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `command` (output to `log`); its wall seconds and peak RSS. A failure stops the bench with the log's end."""
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command[:4])} ... failed ({log}):\n" + "".join(log.read_text().splitlines(True)[-15:]))
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def sdtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdtune", *args]


def train_and_merge(arch: str, base: Path, images: Path, work: Path, row: str) -> dict:
    run, merged = work / f"{arch}-{row}", work / f"{arch}-{row}-merged"
    sets = [f"--set={s}" for s in (*COMMON, *ROWS[row], *ARCH_SETS[arch], f"data.cache_dir={work / 'cache'}")]
    costs = {"train": timed(sdtune("train", "--preset", "cpu", "--data", str(images), "--model", str(base),
                                   "--out", str(run), "--max-steps", "1", *sets), work / f"{arch}-{row}-train.log")}
    costs["merge"] = timed(sdtune("merge", "--ckpt", str(run), "--out", str(merged)), work / f"{arch}-{row}-merge.log")
    for path in merged.iterdir():  # the diffusers folder: only model.safetensors is compared
        if path.name != "model.safetensors":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return {"lora": run / "lora.safetensors", "merged": merged / "model.safetensors", "costs": costs}


def comfy_check(args, base: Path, row: str, run: dict, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{args.comfyui}:{args.comfy_env / 'stubs'}")
    log = work / f"{base.stem}-{row}-comfy.log"
    cost = timed([str(args.comfy_env / "venv" / "bin" / "python"), str(REPO / "bench" / "comfy_lora_check.py"),
                  str(base), f"{row}={run['lora']},{run['merged']}"], log, env)
    built, result = (json.loads(line) for line in log.read_text().splitlines() if line.startswith("{"))
    return result | {"built": built, "costs": run["costs"] | {"comfy": cost}}


def print_row(arch: str, result: dict) -> None:
    parts = "; ".join(f"{name} {p['patched']} patched ({p['equal_in_fp16']} equal in fp16, <= {p['fp16_steps']} ulp), "
                      f"{p['merge_only']['count']} merge-only, error {p['relative_error']:.2g} "
                      f"(fp16 floor {p['fp16_floor']:.2g})" for name, p in result["parts"].items())
    print(f"{result['name']:<8} {arch:<5} keys {result['file_keys']:>5}  not loaded {result['not_loaded']:>3}  "
          f"{parts}", flush=True)
    for line in result["not_loaded_first"] + [k for p in result["parts"].values() for k in p["merge_only"]["first"]]:
        print("    " + line)


def bench_arch(args, arch: str, work: Path, images: Path) -> list[dict]:
    """Each row in turn (train, merge, ComfyUI), its GBs of files deleted before the next (SDXL's merged model
    and ComfyUI's view of it are 7 GB each)."""
    from sdtune.toy.random_pipeline import random_single_file

    started = time.perf_counter()
    base = random_single_file(arch, work / f"base-{arch}.safetensors", dtype="float16")
    results = []
    for row in args.rows:
        results.append(comfy_check(args, base, row, train_and_merge(arch, base, images, work, row), work))
        results[-1]["arch"] = arch
        if len(results) == 1:
            print(f"{base.name}: ComfyUI built {results[0]['built']['base_keys']} weights from the file; it also "
                  f"built (and left uninitialised) {', '.join(results[0]['built']['not_in_file']) or 'none'}, "
                  "not compared")
        print_row(arch, results[-1])
        for path in [] if args.keep else (work / f"{arch}-{row}", work / f"{arch}-{row}-merged"):
            shutil.rmtree(path)
    peaks = {step: max(r["costs"][step]["peak_rss_gib"] for r in results) for step in ("train", "merge", "comfy")}
    print(f"{arch}: {time.perf_counter() - started:.0f} s; peak RSS (mapped model files included) of train "
          f"{peaks['train']} GiB, merge {peaks['merge']} GiB, ComfyUI {peaks['comfy']} GiB", flush=True)
    if not args.keep:
        base.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    comfy_arguments(parser)
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=sorted(ARCH_SETS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.comfy_env is None or args.comfyui is None or not (args.comfy_env / "venv" / "bin" / "python").is_file():
        sys.exit("needs --comfy-env (built by bench/comfy_venv.sh) and --comfyui (a ComfyUI checkout)")
    from support.testing import make_image_folder

    work = args.work or Path(tempfile.mkdtemp(prefix="client-adapters-"))
    work.mkdir(parents=True, exist_ok=True)
    images = make_image_folder(work / "images", count=2, size=64)
    results = [row for arch in args.arch for row in bench_arch(args, arch, work, images)]
    print("results:", save_results("client_adapters", results))
    if not args.keep:
        shutil.rmtree(work)
    failed = [f"{r['name']} {r['arch']}" for r in results if r["not_loaded"] or any(
        p["merge_only"]["count"] or p["fp16_steps"] > 1 for p in r["parts"].values())]
    print(f"failed (keys not loaded, or weights more than one fp16 step from the merge's): {', '.join(failed)}"
          if failed else "every file loads whole in ComfyUI and patches the merged weights (within one fp16 step)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
