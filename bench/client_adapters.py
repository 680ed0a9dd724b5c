"""Issue 28's must-show: every adapter file sdtune writes loads whole in ComfyUI's own loader, and the weights
ComfyUI patches in equal `sdtune merge`'s, on full-size SD1.5 and SDXL architectures.

    bash bench/comfy_venv.sh /tmp/comfy /path/to/ComfyUI       # once: ComfyUI's requirements in a venv
    PYTHONPATH=$PWD .venv/bin/python bench/client_adapters.py --comfy-env /tmp/comfy --comfyui /path/to/ComfyUI \\
        [--arch sd15 sdxl] [--rows lora locon ...] [--work DIR] [--keep]
    (or SDTUNE_COMFY_ENV / SDTUNE_COMFYUI in the environment for the two folders)

Per architecture: a random-weight single file of the full-size model (`sdtune.toy.random_pipeline`, fp16, as
model sites share them); per row (an algorithm and its `--set`s, `ROWS`) one `sdtune train` step at 64 px on
two images through the real command line, then `sdtune merge` of the run; then bench/comfy_lora_check.py in
the ComfyUI environment (no sdtune code there) loads the base with ComfyUI's Load Checkpoint code, each run's
lora.safetensors with its LoraLoader code, and compares the patched weights with each merged model.safetensors
read through the same loader. The learning rate is 0.1 so that one step changes the weights by far more than
fp16 rounds them (the files are fp16). Prints one row per file: keys in the file, keys ComfyUI reported not
loaded, and per model part the keys patched, the keys only the merge changed, and the largest |ComfyUI - merge|
relative to the largest change the adapter made beside the fp16 floor of that measure. Also the wall time and
peak RSS of each command. Results to bench/results/client_adapters.json; the work folder (GBs: SDXL's base,
runs and merged models) is deleted unless --keep.

SDXL needs about 14 GB of RAM for its training step (bf16 autocast over a bf16 frozen base); run it alone.
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


def comfy_check(args, base: Path, runs: dict, work: Path) -> tuple[list[dict], dict]:
    env = dict(os.environ, PYTHONPATH=f"{args.comfyui}:{args.comfy_env / 'stubs'}")
    checks = [f"{row}={r['lora']},{r['merged']}" for row, r in runs.items()]
    log = work / f"comfy-{base.stem}.log"
    cost = timed([str(args.comfy_env / "venv" / "bin" / "python"), str(REPO / "bench" / "comfy_lora_check.py"),
                  str(base), *checks], log, env)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    print(f"{base.name}: ComfyUI built {lines[0]['base_keys']} weights from the file; it also built (and left "
          f"uninitialised) {', '.join(lines[0]['not_in_file']) or 'none'}, not compared")
    return lines[1:], cost


def print_row(arch: str, result: dict) -> None:
    parts = "; ".join(f"{name} {p['patched']} patched ({p['equal_in_fp16']} equal in fp16, <= {p['fp16_steps']} ulp), "
                      f"{p['merge_only']['count']} merge-only, error {p['relative_error']:.2g} "
                      f"(fp16 floor {p['fp16_floor']:.2g})" for name, p in result["parts"].items())
    print(f"{result['name']:<8} {arch:<5} keys {result['file_keys']:>5}  not loaded {result['not_loaded']:>3}  "
          f"{parts}", flush=True)
    for line in result["not_loaded_first"] + [k for p in result["parts"].values() for k in p["merge_only"]["first"]]:
        print("    " + line)


def bench_arch(args, arch: str, work: Path, images: Path) -> list[dict]:
    from sdtune.toy.random_pipeline import random_single_file

    started = time.perf_counter()
    base = random_single_file(arch, work / f"base-{arch}.safetensors", dtype="float16")
    runs = {row: train_and_merge(arch, base, images, work, row) for row in args.rows}
    results, comfy_cost = comfy_check(args, base, runs, work)
    for result in results:
        result |= {"arch": arch, "costs": runs[result["name"]]["costs"] | {"comfy_all_rows": comfy_cost}}
        print_row(arch, result)
    print(f"{arch}: {time.perf_counter() - started:.0f} s; peak RSS train "
          f"{max(r['costs']['train']['peak_rss_gib'] for r in runs.values())} GiB, merge "
          f"{max(r['costs']['merge']['peak_rss_gib'] for r in runs.values())} GiB, ComfyUI "
          f"{comfy_cost['peak_rss_gib']} GiB ({comfy_cost['seconds']} s)", flush=True)
    for path in work.glob(f"*{arch}*"):  # GBs each
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfy-env", type=Path, default=os.environ.get("SDTUNE_COMFY_ENV"),
                        help="the folder bench/comfy_venv.sh built (venv/, stubs/)")
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("SDTUNE_COMFYUI"),
                        help="a ComfyUI source checkout")
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


if __name__ == "__main__":
    main()
