"""The Weights & Biases sink (output.wandb) in WANDB_MODE=offline, no network: what it logged read back from the
offline run's own transaction log (scalars at their steps, the sample grid, the config), a resumed run
continuing the same W&B run, and the one-line error without wandb."""

import glob
import json
import re
import struct
import sys

import pytest
from PIL import Image

from sdtune.config import OutputConfig
from sdtune.errors import SdtuneError
from sdtune.train.metrics import WANDB_MISSING, WANDB_RUN_ID, MetricsLogger, StepRecord


def record(step: int) -> StepRecord:
    return StepRecord(step=step, loss=1.0 / step, learning_rate=1e-4 * step, grad_norm=0.5, seconds_per_step=0.25,
                      images_per_second=4.0, peak_memory_bytes=3 << 30, skipped_steps=0, epoch=1)


def offline_records(run_folder) -> list:
    """The records of an offline run's run-ID.wandb: LevelDB's log format (32 KiB blocks of chunks, each with a
    7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) after W&B's 7-byte ":W&B" file header,
    each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_folder / "run-*.wandb"))
    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B"
    position, records, pending = 7, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def history(records) -> list[dict]:
    """Each step's row: {key: value}, an image's fields under its key ({tag: {"_type": ..., "path": ...}})."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {}
            rows.append(row)
            for item in r.history.item:
                *outer, key = item.nested_key or [item.key]
                (row.setdefault(outer[0], {}) if outer else row)[key] = json.loads(item.value_json)
    return rows


def test_an_offline_run_logs_scalars_grids_and_config_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "config.toml").write_text("[train]\nseed = 3\nlearning_rate = 0.0001\n")  # as the run writes it
    output = OutputConfig(wandb=True, wandb_project="tiny")
    with MetricsLogger.for_run(tmp_path, output, resume_step=0) as metrics:
        metrics.log(record(1))
        metrics.log(record(2))
        metrics.image("validation/samples", 2, Image.new("RGB", (64, 96), "red"))
    run_id = (tmp_path / WANDB_RUN_ID).read_text().strip()
    with MetricsLogger.for_run(tmp_path, output, resume_step=2) as metrics:  # --resume from the step-2 checkpoint
        metrics.log(record(3))
    assert (tmp_path / WANDB_RUN_ID).read_text().strip() == run_id
    first, resumed = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    # one W&B run, in two offline pieces (W&B adds "-1" to the second's folder when both start in one second)
    assert all(re.search(rf"-{run_id}(-\d+)?$", piece) for piece in (first, resumed)), (first, resumed)
    records = offline_records(tmp_path / "wandb" / first)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name) == (run_id, "tiny", tmp_path.name)
    assert json.loads({item.key: item.value_json for item in run.config.update}["train"]) == {
        "seed": 3, "learning_rate": 0.0001}
    rows = history(records)
    assert [row["_step"] for row in rows] == [1, 2]
    assert [row["train/loss"] for row in rows] == [1.0, 0.5]
    assert rows[1]["train/learning_rate"] == pytest.approx(2e-4) and rows[1]["train/peak_memory_gib"] == 3
    grid = rows[1]["validation/samples"]
    assert grid["_type"] == "image-file" and (grid["width"], grid["height"]) == (64, 96)
    assert (tmp_path / "wandb" / first / "files" / grid["path"]).is_file()
    assert [(row["_step"], row["train/loss"]) for row in history(offline_records(tmp_path / "wandb" / resumed))] == [
        (3, pytest.approx(1 / 3))]


def test_missing_wandb_is_one_line_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes the import raise ImportError
    with pytest.raises(SdtuneError) as info:
        MetricsLogger.for_run(tmp_path, OutputConfig(wandb=True), resume_step=0)
    assert str(info.value) == WANDB_MISSING and "pip install 'sdtune[wandb]'" in WANDB_MISSING
    assert list(tmp_path.iterdir()) == []


def test_a_training_run_sends_its_steps_grids_and_resolved_config(tiny_sd1, images, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from support.helpers import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    summary = train(tiny_sd1, images, out, "--max-steps", "2", "--set", "output.wandb=true",
                    "--set", "output.sample_every=2", "--set", "output.sample_prompts=a red circle --w 96",
                    "--set", "output.sample_steps=1")
    (folder,) = (out / "wandb").glob("offline-run-*")
    records = offline_records(folder)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["max_steps"] == 2 and config["output"]["wandb"] is True  # OUT/config.toml
    rows = history(records)
    assert [row["train/loss"] for row in rows] == pytest.approx(summary["losses"])
    assert rows[1]["validation/samples"]["width"] == 96  # the step-2 grid: one 96-px cell
