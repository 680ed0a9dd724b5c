"""sdtune.train.metrics: metrics.jsonl (and its truncation on resume), TensorBoard read back by tensorboard's own
reader, rank 0 alone writing, the one-line error without tensorboard, and the progress bar."""

import dataclasses
import io
import json
import subprocess
import sys
from contextlib import closing

import pytest
import torch
from PIL import Image
from rich.console import Console

from sdtune.config import OutputConfig
from sdtune.errors import SdtuneError
from sdtune.train.metrics import TENSORBOARD_MISSING, JsonlSink, MetricsLogger, ProgressSink, StepRecord

torch.set_num_threads(1)

TAGS = ["train/loss", "train/learning_rate", "train/grad_norm", "train/seconds_per_step",
        "train/images_per_second", "train/peak_memory_gib", "train/skipped_steps", "train/average_loss",
        "train/epoch"]


def record(step: int, loss: float | None = None, grad_norm: float | None = 0.5) -> StepRecord:
    return StepRecord(step=step, loss=1.0 / step if loss is None else loss, learning_rate=1e-4 * step,
                      grad_norm=grad_norm, seconds_per_step=0.25, images_per_second=4.0,
                      peak_memory_bytes=3 << 30, skipped_steps=step // 2, epoch=(step + 1) // 2, average_loss=0.75)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_jsonl_records_read_back_equal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 9}\n')  # a fresh run starts an empty file
    records = [record(1, grad_norm=None), record(2)]
    with MetricsLogger.for_run(tmp_path, OutputConfig(), resume_step=0) as metrics:
        for r in records:
            metrics.log(r)
    rows = read_jsonl(path)
    assert [StepRecord(**row) for row in rows] == records
    assert list(rows[0]) == list(records[0].to_dict()) and rows[0]["grad_norm"] is None
    assert not (tmp_path / "logs").exists()  # output.tensorboard is off by default


def test_jsonl_is_flushed_each_line_and_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(record(1, loss=float("nan")))
    rows = read_jsonl(path)  # before close: a killed run keeps what it logged
    sink.close()
    assert len(rows) == 1 and rows[0]["loss"] is None  # NaN is not JSON: null
    assert "NaN" not in path.read_text()


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with closing(JsonlSink(path)) as sink:
        for step in range(1, 6):
            sink.log(record(step))
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # torn by the kill
    with MetricsLogger.for_run(tmp_path, OutputConfig(), resume_step=3) as metrics:
        metrics.log(record(4, loss=9.0))
    rows = read_jsonl(path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[3]["loss"] == 9.0 and rows[2] == record(3).to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no tmp file left


def test_tensorboard_scalars_and_image_read_back(tmp_path):
    grid = Image.new("RGB", (8, 6), (255, 0, 0))
    with MetricsLogger.for_run(tmp_path, OutputConfig(tensorboard=True), resume_step=0) as metrics:
        metrics.log(record(1))
        metrics.log(record(2, grad_norm=None))
        metrics.image("validation/grid", 2, grid)
    acc = accumulator(tmp_path / "logs")
    assert sorted(acc.Tags()["scalars"]) == sorted(TAGS)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]
    assert [e.step for e in acc.Scalars("train/grad_norm")] == [1]  # None is skipped
    assert [e.value for e in acc.Scalars("train/peak_memory_gib")] == [3.0, 3.0]
    assert [e.value for e in acc.Scalars("train/skipped_steps")] == [0, 1]
    assert acc.Scalars("train/learning_rate")[1].value == pytest.approx(2e-4)
    [event] = acc.Images("validation/grid")
    assert (event.step, event.width, event.height) == (2, 8, 6)
    decoded = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
    assert list(decoded.getdata()) == list(grid.getdata())


def test_tensorboard_resume_purges_and_fresh_run_starts_over(tmp_path):
    cfg = OutputConfig(tensorboard=True)
    with MetricsLogger.for_run(tmp_path, cfg, resume_step=0) as metrics:
        for step in range(1, 6):
            metrics.log(record(step))
    with MetricsLogger.for_run(tmp_path, cfg, resume_step=3) as metrics:
        metrics.log(record(4, loss=9.0))
    values = [(e.step, e.value) for e in accumulator(tmp_path / "logs").Scalars("train/loss")]
    assert values == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 9.0)]
    with MetricsLogger.for_run(tmp_path, cfg, resume_step=0) as metrics:
        metrics.log(record(1, loss=7.0))
    assert [(e.step, e.value) for e in accumulator(tmp_path / "logs").Scalars("train/loss")] == [(1, 7.0)]


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = OutputConfig(tensorboard=True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
    for rank in (1, None):  # the argument, then the launcher's $RANK
        with MetricsLogger.for_run(tmp_path, cfg, resume_step=0, progress=ProgressSink(Console(), 5),
                                   rank=rank) as metrics:
            metrics.log(record(1))
            assert metrics.sinks == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_torch_distributed_rank_comes_before_the_environment(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with MetricsLogger.for_run(tmp_path / "out", OutputConfig(), resume_step=0) as metrics:
            metrics.log(record(1))
    finally:
        dist.destroy_process_group()
    assert [row["step"] for row in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == [1]


def test_missing_tensorboard_is_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise ImportError
    with pytest.raises(SdtuneError) as info:
        MetricsLogger.for_run(tmp_path, OutputConfig(tensorboard=True), resume_step=0)
    assert str(info.value) == TENSORBOARD_MISSING and "\n" not in str(info.value)
    assert "pip install 'sdtune[tensorboard]'" in str(info.value)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the error came before the truncation


def test_progress_bar_shows_the_record():
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    with MetricsLogger([ProgressSink(console, total_steps=10)]) as metrics:
        metrics.log(record(7))
        metrics.log(record(8, loss=0.123456))
    out = console.file.getvalue()
    assert "loss 0.1235" in out and "8/10" in out
    assert "lr 8.00e-04" in out and "0.250 s/step" in out and "peak 3.00 GiB" in out


def test_progress_bar_shows_the_epoch_and_the_moving_average_loss():
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    with MetricsLogger([ProgressSink(console, total_steps=10, epochs=3)]) as metrics:
        metrics.log(dataclasses.replace(record(7, loss=0.5), epoch=2, average_loss=0.3125))
    assert "epoch 2/3  loss 0.5000 (avg 0.3125)" in console.file.getvalue()


def test_progress_bar_of_a_resumed_run_starts_at_its_first_record():
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    with MetricsLogger([ProgressSink(console, total_steps=10)]) as metrics:
        metrics.log(record(7))
    assert "7/10" in console.file.getvalue()


def test_progress_bar_without_records_never_shows():
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    ProgressSink(console, total_steps=10).close()  # a resumed run with nothing left to do
    assert console.file.getvalue() == ""


def test_close_twice_closes_every_sink_once():
    class Sink:
        def __init__(self, fail=False):
            self.closed, self.fail = 0, fail

        def close(self):
            self.closed += 1
            if self.fail:
                raise OSError("disk full")

    sinks = [Sink(fail=True), Sink(), Sink(fail=True)]
    metrics = MetricsLogger(sinks)
    with pytest.raises(OSError):
        metrics.close()  # a sink failing (in either order) still closes the others
    metrics.close()
    assert [sink.closed for sink in sinks] == [1, 1, 1]


def test_import_loads_nothing_heavy():
    code = ("import sys, sdtune.train.metrics; heavy = {'torch', 'rich', 'tensorboard', 'numpy', 'PIL'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_training_run_logs_every_step_to_jsonl_and_tensorboard(tiny_sd1, images, tmp_path):
    """`sdtune train --set output.tensorboard=true`: the loop's records reach both sinks, the validation
    grids reach TensorBoard, and a resumed run continues the same history without duplicates."""
    from support.helpers import train

    out = tmp_path / "out"
    args = ["--set", "output.tensorboard=true", "--set", "output.checkpoint_every=2", "--set", "output.sample_every=2",
            "--set", "output.sample_prompts=['a red circle']", "--set", "output.sample_steps=2"]
    first = train(tiny_sd1, images, out, "--max-steps", "2", *args)
    summary = train(tiny_sd1, images, out, "--max-steps", "4", "--resume", *args)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss"] for row in rows] == pytest.approx(summary["losses"])
    assert summary["losses"][:2] == first["losses"]
    assert all(row["grad_norm"] > 0 and row["learning_rate"] > 0 and row["images_per_second"] > 0 for row in rows)
    acc = accumulator(out / "logs")
    assert set(TAGS) <= set(acc.Tags()["scalars"])
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx(summary["losses"], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/grad_norm")] == pytest.approx([row["grad_norm"] for row in rows])
    assert [e.step for e in acc.Images("validation/samples")] == [2, 4]


def test_tensorboard_asked_for_and_missing_stops_the_run_before_it_loads_anything(tiny_sd1, images, tmp_path,
                                                                                   monkeypatch):
    from support.helpers import runner

    from sdtune.cli import app

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise ImportError
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(tmp_path / "out"), "--set", "output.tensorboard=true"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"error: {TENSORBOARD_MISSING}"
    assert not (tmp_path / "out" / "config.toml").exists()


def test_phase_seconds_are_written_only_for_a_profiled_step(tmp_path):
    """SDTUNE_PROFILE=1's phase seconds are keys of metrics.jsonl; without it the record has none of them."""
    profiled = dataclasses.replace(record(1), data_seconds=0.01, forward_backward_seconds=0.2, optimizer_seconds=0.1,
                                   host_wait_seconds=0.05)
    with MetricsLogger.for_run(tmp_path, OutputConfig(), resume_step=0) as metrics:
        metrics.log(record(1))
        metrics.log(dataclasses.replace(profiled, step=2))
    plain, timed = read_jsonl(tmp_path / "metrics.jsonl")
    assert "data_seconds" not in plain and StepRecord(**plain) == record(1)
    assert (timed["data_seconds"], timed["forward_backward_seconds"], timed["optimizer_seconds"]) == (0.01, 0.2, 0.1)
    assert timed["host_wait_seconds"] == 0.05
    assert StepRecord(**timed) == dataclasses.replace(profiled, step=2)
