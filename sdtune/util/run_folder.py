"""The names in an sdtune run's `--out`, for every place that asks whether a folder is one: `is_run_folder`
(the model loader, the data scan, the --out check) and `is_finished_run`. The checkpoints themselves are
written and read by `sdtune.train.store`.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"
STATE = "state.json"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # a LoRA run's adapters for diffusers' load_lora_weights
KOHYA_FILE = "lora.safetensors"  # ... and in kohya's layout, for ComfyUI and AUTOMATIC1111
SUMMARY = "summary.json"  # a finished run's summary, beside its exported model (`sdtune.export.run_output`)


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE).is_file()]
    return sorted(done, key=lambda p: p.name)


def run_files(folder: Path) -> list[str]:
    """What marks `folder` as an sdtune run's --out: the files beside its `config.toml` that every run writes
    (metrics.jsonl as its loop starts, then checkpoints/ and summary.json). Empty for any other folder, also one
    that holds a config.toml of its own (kohya's, say): the lock is no mark, as the run checking holds it."""
    folder = Path(folder)
    if not (folder / "config.toml").is_file():
        return []
    return [name for name in ("metrics.jsonl", CHECKPOINTS, SUMMARY) if (folder / name).exists()]


def is_run_folder(folder: Path) -> bool:
    return bool(run_files(folder))


def is_finished_run(folder: Path) -> bool:
    """A run that exported its model and deleted its resume checkpoints (output.keep_final_state=false)."""
    return (Path(folder) / SUMMARY).is_file() and not list_checkpoints(folder)
