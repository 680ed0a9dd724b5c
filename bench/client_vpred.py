"""Issue 29's must-show for v-prediction: a full-size SDXL single file written by sdtune's exporter with
v-prediction and zero terminal SNR is detected as such by ComfyUI's own loader and read back so by sdtune.

    bash bench/comfy_venv.sh /tmp/comfy /path/to/ComfyUI       # once: ComfyUI's requirements in a venv
    PYTHONPATH=$PWD .venv/bin/python bench/client_vpred.py --comfy-env /tmp/comfy --comfyui /path/to/ComfyUI
    (or SDTUNE_COMFY_ENV / SDTUNE_COMFYUI in the environment for the two folders)

For each case (epsilon; v-prediction; v-prediction with zero terminal SNR): a random-weight single file of
the full-size SDXL architecture in fp16 (`sdtune.toy.random_pipeline.random_single_file`, which writes it
through `sdtune.export.single_file.write_single_file`, the exporter of a run's model.safetensors, with the
`v_pred` / `ztsnr` markers), sdtune's own reading of its header (`inspect_single_file`), then
bench/comfy_vpred_check.py in the ComfyUI environment: `comfy.sd.load_checkpoint_guess_config` and the
model type and sampling it detected. One line per case; results to bench/results/client_vpred.json. The
file (7 GB) is deleted after each case. Exits 1 when ComfyUI or sdtune reads a case otherwise.

Peak RSS about 10 GB (the file written, then ComfyUI's UNet in fp16 beside the loaded state dict); run it alone.
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

from _common import comfy_arguments, save_results

REPO = Path(__file__).resolve().parents[1]
# case: (prediction_type, zero_terminal_snr, what ComfyUI must detect: model_type, zsnr)
CASES = {"epsilon": ("epsilon", False, ("EPS", False)),
         "v_prediction": ("v_prediction", False, ("V_PREDICTION", False)),
         "v_prediction+ztsnr": ("v_prediction", True, ("V_PREDICTION", True))}


def check_case(args, name: str, work: Path) -> dict:
    from sdtune.family.load import inspect_single_file
    from sdtune.toy.random_pipeline import random_single_file

    prediction, ztsnr, expected = CASES[name]
    path = work / f"sdxl-{name.replace('+', '-')}.safetensors"
    started = time.perf_counter()
    random_single_file("sdxl", path, dtype="float16", prediction_type=prediction, zero_terminal_snr=ztsnr)
    own = inspect_single_file(path)
    env = dict(os.environ, PYTHONPATH=f"{args.comfyui}:{args.comfy_env / 'stubs'}")
    python, script = args.comfy_env / "venv" / "bin" / "python", REPO / "bench" / "comfy_vpred_check.py"
    done = subprocess.run([str(python), str(script), str(path)], env=env, capture_output=True, text=True, cwd=REPO)
    path.unlink()
    if done.returncode:
        sys.exit(f"ComfyUI failed on {name}:\n{done.stderr[-3000:]}")
    comfy = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    comfy_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"case": name, "comfyui": comfy, "sdtune_reads": {"prediction_type": own.prediction_type,
                                                             "zero_terminal_snr": own.zero_terminal_snr},
            "ok": (comfy["model_type"], comfy["zsnr"]) == expected
            and (own.prediction_type, own.zero_terminal_snr) == (prediction, ztsnr),
            "seconds": round(time.perf_counter() - started, 1), "comfy_peak_rss_gib": round(comfy_peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    comfy_arguments(parser)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    args = parser.parse_args()
    if not (args.comfy_env and args.comfyui):
        sys.exit("pass --comfy-env and --comfyui (or set SDTUNE_COMFY_ENV and SDTUNE_COMFYUI)")
    work = args.work or Path(tempfile.mkdtemp(prefix="sdtune-vpred-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.cases:
        results.append(check_case(args, name, work))
        r = results[-1]
        print(f"{name:<20} ComfyUI: {r['comfyui']['model_config']} {r['comfyui']['model_type']} zsnr="
              f"{r['comfyui']['zsnr']} sigmas {r['comfyui']['sigma_min']}..{r['comfyui']['sigma_max']}; sdtune reads "
              f"{r['sdtune_reads']['prediction_type']} zero_terminal_snr={r['sdtune_reads']['zero_terminal_snr']}; "
              f"{'ok' if r['ok'] else 'WRONG'} ({r['seconds']} s)", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS: this process {peak:.1f} GiB, ComfyUI {max(r['comfy_peak_rss_gib'] for r in results)} GiB")
    save_results("client_vpred", {"cases": results, "peak_rss_gib": round(peak, 2)})
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
