"""Reliability: signals, SIGKILL and resume, NaN/Inf steps, running out of GPU memory, output folder safety.

The signal and kill tests start `python -m sdtune.cli train` as real processes (one torch thread each,
as the test process has); the rest run in this process. Out of memory is simulated on the CPU: the
micro step raises `torch.OutOfMemoryError` as CUDA's allocator would.
"""

import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.helpers import KEEP_ALL, final_unet, on_step, prepared, runner, said, train

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.estimate import fallback as replan
from sdtune.train import loop as trainer
from sdtune.train import objective as loss

ROOT = Path(__file__).parents[2]


@pytest.fixture
def spawn():
    """`spawn(model, images, out, *args)`: `sdtune train --preset cpu` in a new process, its output in OUT.log
    (beside OUT); whatever still runs when the test ends is killed."""
    started = []

    def start(model, images, out: Path, *extra) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        with open(out.with_suffix(".log"), "w") as log:  # the child keeps its own descriptor
            started.append(subprocess.Popen(
                [sys.executable, "-m", "sdtune.cli", "train", "--preset", "cpu", "--data", str(images),
                 "--model", str(model), "--out", str(out), *extra], stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=ROOT))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_for_checkpoint(process: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    """Until checkpoint `step` or a later one is complete (its state.json is written last)."""
    deadline = time.monotonic() + timeout
    while not any(int(p.parent.name[5:]) >= step for p in (out / "checkpoints").glob("step-??????/state.json")):
        assert process.poll() is None, out.with_suffix(".log").read_text()
        assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.01)


def test_sigint_and_sigterm_finish_the_step_save_and_say_how_to_resume(tiny_sd1, images, tmp_path, spawn):
    args = ("--max-steps", "100000", "--set", "output.checkpoint_every=2")
    outs = {sig: tmp_path / sig.name for sig in (signal.SIGINT, signal.SIGTERM)}
    processes = {sig: spawn(tiny_sd1, images, out, *args) for sig, out in outs.items()}  # both at once: faster
    for sig, process in processes.items():
        _wait_for_checkpoint(process, outs[sig], 2)
        process.send_signal(sig)
    for sig, process in processes.items():
        assert process.wait(timeout=120) == 128 + sig, outs[sig].with_suffix(".log").read_text()
        log = outs[sig].with_suffix(".log").read_text()
        assert f"{sig.name}: finishing this step, then saving a checkpoint" in log
        [line] = [line for line in log.splitlines() if "resume with:" in line]
        step = int(line.split("stopped after step ")[1].split(",")[0])
        assert (outs[sig] / "checkpoints" / f"step-{step:06d}" / "state.json").is_file()
        command = shlex.split(line.split("resume with: ")[1])
        assert command[:2] == ["sdtune", "train"] and command[-1] == "--resume"
        command[command.index("--max-steps") + 1] = str(step + 2)  # the printed command, two steps more
        result = runner.invoke(app, command[1:])
        assert result.exit_code == 0, result.output
        assert f"resumed from {outs[sig] / 'checkpoints' / f'step-{step:06d}'} at step {step}" in result.output
        assert json.loads((outs[sig] / "summary.json").read_text())["steps"] == step + 2


LORA_WITH_PRIOR = ("--set", "train.method=lora", "--set", "lora.rank=4", "--set", "train.learning_rate=1e-3",
                   "--set", "data.num_class_images=2")


ADAPTERS = {"loha": ("--set", "lora.algo=loha", "--set", "lora.target=attention+conv"),
            "lokr": ("--set", "lora.algo=lokr", "--set", "lora.rank=2", "--set", "lora.factor=4"),
            "dora": ("--set", "lora.dora=true", "--set", "lora.text_encoder=true")}
EMBEDDING = ("--set", "train.method=embedding", "--set", "embedding.token=<sks>", "--set", "embedding.vectors=2",
             "--set", "train.learning_rate=1e-2")


@pytest.mark.parametrize("method", ["full", "lora+prior", "loha", "lokr", "dora", "embedding"])
def test_a_run_killed_at_a_random_step_resumes_to_the_same_weights(tiny_sd1, images, tmp_path, spawn, method):
    seed = 7
    rng = random.Random(seed)
    after, delay = rng.choice([2, 4, 6]), rng.uniform(0.0, 0.2)  # kill after checkpoint `after`, in some step
    where = f"{method}, seed {seed}: killed {delay:.3f} s after checkpoint {after}"
    args = ("--max-steps", "10", "--set", "output.checkpoint_every=2", "--set", "output.keep_checkpoints=5")
    if method == "lora+prior":  # a LoRA with DreamBooth's class images (the user's: none is generated)
        shutil.copytree(images, tmp_path / "class")
        args += (*LORA_WITH_PRIOR, "--set", f"data.class_dir={tmp_path / 'class'}")
    if method in ADAPTERS:  # LyCORIS' adapters and DoRA through peft: their checkpoints resume as a LoRA's do
        args += ("--set", "train.method=lora", "--set", "train.learning_rate=1e-3", *ADAPTERS[method])
    if method == "embedding":  # textual inversion: captions that name the new word
        images = shutil.copytree(images, tmp_path / "token")
        for caption in images.glob("*.txt"):
            caption.write_text(caption.read_text().replace("a ", "a <sks> ", 1))
        args += EMBEDDING
    killed = tmp_path / "killed"
    process = spawn(tiny_sd1, images, killed, *args)
    _wait_for_checkpoint(process, killed, after)  # polled from the start: a quiet machine runs all 10 steps in 1 s
    assert (killed / "checkpoints" / f"step-{after:06d}").is_dir(), f"{where}: polled too late"
    time.sleep(delay)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL, f"{where}: the run ended before the kill"
    expected = train(tiny_sd1, images, tmp_path / "straight", *args)
    assert not (killed / "summary.json").exists(), where
    resumed = train(tiny_sd1, images, killed, *args, "--resume")
    assert resumed["losses"] == expected["losses"], where
    shared = {"full": final_unet, "embedding": lambda out: load_file(out / "embedding.safetensors")}
    final = shared.get(method, lambda out: load_file(out / "lora.safetensors"))
    a, b = final(tmp_path / "straight"), final(killed)
    assert all(torch.equal(a[k], b[k]) for k in a), f"{where}: the final weights differ"


def test_the_stop_handler_ignores_a_second_signal_and_restores_the_previous_handlers(tiny_sd1, images, tmp_path,
                                                                                     monkeypatch, caplog):
    run = prepared(tiny_sd1, images, tmp_path / "out", "train.max_steps=50")
    caplog.set_level(logging.INFO, logger="sdtune")  # the loop's lines, not prepare's
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real_save = trainer._save

    def progress(record):
        if record.step == 3:
            signal.raise_signal(signal.SIGTERM)

    def save_with_a_second_signal(run):
        signal.raise_signal(signal.SIGINT)  # while saving: reported, ignored
        return real_save(run)

    monkeypatch.setattr(trainer, "_save", save_with_a_second_signal)
    with pytest.raises(trainer.Interrupted, match="SIGTERM: stopped after step 3") as stopped:
        trainer.loop(run, on_step(progress))
    assert stopped.value.exit_code == 143 and stopped.value.saved.name == "step-000003"
    assert run.step == 3 and (stopped.value.saved / "state.json").is_file()
    messages = said(caplog)
    assert messages[0] == "SIGTERM: finishing this step, then saving a checkpoint"
    assert messages[1].startswith("SIGINT ignored: already stopping and saving a checkpoint")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_ctrl_c_outside_the_loop_says_how_to_resume_too(tiny_sd1, images, tmp_path, monkeypatch):
    def prepare(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl+C while the model loads: Python's own handler is in place there

    monkeypatch.setattr(trainer, "prepare", prepare)
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 130
    assert (f"SIGINT: stopped outside the training loop; resume with: sdtune train --preset cpu --data {images} "
            f"--model {tiny_sd1} --out {tmp_path / 'out'} --resume") in " ".join(result.output.split())


def _nan_at(monkeypatch, calls: set[int]) -> None:
    """Make `loss.diffusion_loss` return NaN on its calls numbered in `calls` (0-based), graph kept."""
    real, count = loss.diffusion_loss, [0]

    def diffusion_loss(*args, **kwargs):
        value = real(*args, **kwargs)
        count[0] += 1
        return value * float("nan") if count[0] - 1 in calls else value

    monkeypatch.setattr(loss, "diffusion_loss", diffusion_loss)


@pytest.mark.parametrize("overrides", [
    [],
    ["memory.precision=bf16"],
    ["memory.precision=fp16"],
    ["memory.optimizer_offload=cpu", "train.max_grad_norm=0"],  # steps each bucket during backward
])
def test_a_nan_loss_is_not_backpropagated_and_its_step_is_skipped(tiny_sd1, images, tmp_path, monkeypatch, overrides):
    run = prepared(tiny_sd1, images, tmp_path / "o", "train.max_steps=4", *overrides)
    _nan_at(monkeypatch, {1})
    weights = []
    trainer.loop(run, on_step(lambda record: weights.append(_cloned(trainer.fp32_weights(run)))))
    assert math.isnan(run.losses[1]) and all(math.isfinite(v) for i, v in enumerate(run.losses) if i != 1)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert any(not torch.equal(weights[1][k], weights[3][k]) for k in weights[0])  # later steps train
    assert all(torch.isfinite(v).all() for v in weights[3].values())
    assert run.skipped_steps >= 1


def test_a_skipped_accumulation_step_leaves_no_gradient_behind_in_any_optimizer_tier(tiny_sd1, images, tmp_path,
                                                                                     monkeypatch):
    """Micro-batch 1 of step 1 trains, micro-batch 2 is NaN: the step is dropped whole, and step 2 sees only its
    own gradients, on the plain optimizer (gradients set to None) as on the host-RAM tier (the next replaces)."""
    runs = {}
    for tier in ("none", "cpu"):
        _nan_at(monkeypatch, {1})
        run = prepared(tiny_sd1, images, tmp_path / tier, "train.max_steps=3", "train.gradient_accumulation_steps=2",
                       f"memory.optimizer_offload={tier}")
        trainer.loop(run)
        runs[tier] = run
    assert runs["none"].skipped_steps == runs["cpu"].skipped_steps == 1
    assert math.isnan(runs["cpu"].losses[0]) and runs["cpu"].losses[1:] == pytest.approx(runs["none"].losses[1:])
    plain, offloaded = trainer.fp32_weights(runs["none"]), trainer.fp32_weights(runs["cpu"])
    for name, weight in plain.items():
        torch.testing.assert_close(offloaded[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_a_nan_gradient_with_a_finite_loss_is_skipped_too(tiny_sd1, images, tmp_path):
    run = prepared(tiny_sd1, images, tmp_path / "o", "train.max_steps=3")
    first = next(run.components.unet.parameters())
    first.register_hook(lambda grad: grad * float("nan") if run.step == 1 else grad)
    weights = []
    trainer.loop(run, on_step(lambda record: weights.append(_cloned(trainer.fp32_weights(run)))))
    assert all(math.isfinite(v) for v in run.losses) and run.skipped_steps == 1
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_consecutive_bad_steps_stop_the_run_keeping_the_newest_checkpoint(tiny_sd1, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run = prepared(tiny_sd1, images, out, "train.max_steps=10", "output.checkpoint_every=2", "train.max_bad_steps=3")
    _nan_at(monkeypatch, {1, 3, 4, 5, 6})  # steps 2, then 4-6 in a row
    with pytest.raises(SdtuneError) as stopped:
        trainer.loop(run)
    message = str(stopped.value)
    assert message.startswith("3 steps in a row had a NaN/Inf loss or gradient, the last at step 6")
    assert f"the newest checkpoint, {out / 'checkpoints' / 'step-000004'}, is kept" in message  # none at 6
    assert "lower train.learning_rate" in message and "bf16 or fp32 instead of fp16" in message
    assert run.skipped_steps == 4 and run.step == 6

    run = prepared(tiny_sd1, images, tmp_path / "never", "train.max_steps=6", "train.max_bad_steps=0")
    _nan_at(monkeypatch, {0, 1, 2, 3, 4, 5})
    trainer.loop(run)  # 0: never stops
    assert run.step == 6 and run.skipped_steps == 6


def _cloned(weights: dict) -> dict:
    return {k: v.clone() for k, v in weights.items()}


def _out_of_memory_at(monkeypatch, when) -> list:
    """Make the micro step raise torch.OutOfMemoryError once for each (index, plan) that `when` accepts."""
    real, raised = trainer.micro_step, []

    def micro_step(run, index, last=True, phases=None):
        if when(index, run.cfg.memory) and (index, run.cfg.memory) not in raised:
            raised.append((index, run.cfg.memory))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (simulated)")
        return real(run, index, last, phases)

    monkeypatch.setattr(trainer, "micro_step", micro_step)
    return raised


def test_out_of_memory_names_the_plan_its_estimate_and_the_next_smaller_plan(tiny_sd1, images, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "out"
    base = ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1), "--out", str(out),
            "--max-steps", "4", "--set", "output.checkpoint_every=2"]
    _out_of_memory_at(monkeypatch, lambda index, memory: index == 2 and not memory.gradient_checkpointing)
    result = runner.invoke(app, base)
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # one line, however the terminal wraps it
    message = message[message.index("error: "):]
    assert message.startswith("error: out of GPU memory in step 3 under cpu (fp32, gradient_checkpointing off, "
                              "optimizer_offload none, param_offload none, 64 px x batch 2), estimated 0.0")
    assert ("GiB; the next smaller plan is cpu (fp32, gradient_checkpointing on, optimizer_offload none, "
            "param_offload none, 64 px x batch 2), estimated 0.0" in message)
    assert (f"run the same command with --on-oom fallback, or with --set memory.gradient_checkpointing=true "
            f"--resume, to continue from {out / 'checkpoints' / 'step-000002'}") in message
    result = runner.invoke(app, [*base, "--set", "memory.gradient_checkpointing=true", "--resume"])  # as it says
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["gradient_checkpointing"] is True


def test_on_oom_fallback_continues_on_each_next_smaller_plan(tiny_sd1, images, tmp_path, monkeypatch):
    class Estimate:
        total = 2**30

    monkeypatch.setattr("sdtune.estimate.estimate", lambda cfg, info: Estimate())
    args = ("--max-steps", "8", "--set", "output.checkpoint_every=2")
    expected = train(tiny_sd1, images, tmp_path / "straight", *args)
    raised = _out_of_memory_at(monkeypatch, lambda index, memory: (index, memory.gradient_checkpointing,
                                                                    memory.optimizer_offload) in
                               {(3, False, "none"), (5, True, "none")})
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(out), "--on-oom", "fallback", *KEEP_ALL, *args])
    assert result.exit_code == 0, result.output
    assert len(raised) == 2
    message = " ".join(result.output.split())
    assert ("out of GPU memory in step 4 under cpu (fp32, gradient_checkpointing off, optimizer_offload none, "
            "param_offload none, 64 px x batch 2), estimated 1.00 GiB; --on-oom fallback (--set "
            "memory.gradient_checkpointing=true): continuing from the newest checkpoint on cpu (fp32, "
            "gradient_checkpointing on, optimizer_offload none, param_offload none, 64 px x batch 2)") in message
    assert "resumed from" in message and "at step 2" in message and "at step 4" in message
    assert ("out of GPU memory in step 6 under cpu (fp32, gradient_checkpointing on, optimizer_offload none, "
            "param_offload none, 64 px x batch 2), estimated 1.00 GiB; --on-oom fallback (--set "
            "memory.optimizer_offload=cpu): continuing from the newest checkpoint on cpu (fp32, "
            "gradient_checkpointing on, optimizer_offload cpu, param_offload none, 64 px x batch 2)") in message
    assert "optimizer state: from memory.optimizer_offload=none to cpu" in message
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["gradient_checkpointing"] and summary["optimizer_offload"] == "cpu"
    assert load_config(str(out / "config.toml"))[0].memory.optimizer_offload == "cpu"
    assert summary["losses"] == pytest.approx(expected["losses"], rel=1e-5)  # the same training, plan aside
    a, b = final_unet(tmp_path / "straight"), final_unet(out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_may_change_the_neutral_memory_levers_but_not_precision(tiny_sd1, images, tmp_path):
    args = ("--max-steps", "4", "--set", "output.checkpoint_every=2", "--set", "memory.optimizer_offload=cpu")
    expected = train(tiny_sd1, images, tmp_path / "straight", *args)
    out = tmp_path / "out"
    train(tiny_sd1, images, out, "--max-steps", "2", *args[2:])
    base = ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1), "--out", str(out),
            "--max-steps", "4", "--resume"]
    result = runner.invoke(app, [*base, "--set", "memory.precision=bf16"])
    assert result.exit_code == 2 and "memory.precision: 'fp32' -> 'bf16'" in result.output
    (tmp_path / "state").mkdir()
    result = runner.invoke(app, [*base, "--set", "memory.optimizer_offload=nvme", "--set",
                                 f"memory.offload_dir={tmp_path / 'state'}"])
    assert result.exit_code == 2 and "memory.optimizer_offload: 'cpu' -> 'nvme'" in result.output
    resumed = train(tiny_sd1, images, out, *base[-3:])  # host-RAM tier -> in-memory AdamW: the state is converted
    assert resumed["optimizer_offload"] == "none" and resumed["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    a, b = final_unet(tmp_path / "straight"), final_unet(out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("preset", "overrides", "expected"), [
    ("cpu", [], ("memory.gradient_checkpointing=true",)),
    ("cpu", ["memory.gradient_checkpointing=true"], ("memory.optimizer_offload=cpu",)),
    ("rtx4090", [], ("memory.gradient_checkpointing=true",)),
    ("rtx4090", ["memory.optimizer_offload=cpu"], ("memory.gradient_checkpointing=true",)),
    ("rtx3050", [], ("memory.param_offload=cpu",)),
    ("rtx3050", ["memory.param_offload=cpu"], None),
    ("rtx2070", [], ("memory.param_offload=cpu",)),  # fp16 stays fp16
    ("rtx4090", ["memory.optimizer=adamw8bit", "memory.gradient_checkpointing=true"], None),  # no offload for it
])
def test_the_next_smaller_plan_pulls_one_more_lever_in_auto_order(preset, overrides, expected):
    cfg, info = load_config(preset, overrides)
    fallback = replan.next_smaller(cfg, info)
    assert (fallback and fallback.overrides) == expected
    if fallback:
        smaller, _ = load_config(preset, [*overrides, *fallback.overrides])
        assert smaller.memory == fallback.memory and smaller.memory.precision == cfg.memory.precision


def test_out_with_a_config_toml_of_its_own_is_not_taken_for_a_run(tiny_sd1, images, tmp_path):
    """A kohya project folder as --out: its config.toml is the user's, not an sdtune run's, so the run is
    refused (as the data scan and --model judge it) instead of writing over it."""
    kohya = tmp_path / "kohya"
    kohya.mkdir()
    (kohya / "config.toml").write_text("[general]\nshuffle_caption = true\n")
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(kohya), "--max-steps", "1"])
    assert result.exit_code == 2 and "is not an sdtune output folder" in result.output, result.output
    assert sorted(p.name for p in kohya.iterdir()) == ["config.toml"]
    assert (kohya / "config.toml").read_text() == "[general]\nshuffle_caption = true\n"


def test_out_refuses_a_foreign_or_used_folder_unless_overwrite(tiny_sd1, images, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not mine")
    base = ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1), "--max-steps", "2"]
    result = runner.invoke(app, [*base, "--out", str(foreign)])
    assert result.exit_code == 2 and "is not an sdtune output folder" in result.output
    assert "--overwrite" in result.output and sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    train(tiny_sd1, images, foreign, "--max-steps", "2", "--overwrite")
    assert (foreign / "holiday.jpg").read_bytes() == b"not mine" and (foreign / "unet").is_dir()

    used = tmp_path / "used"
    train(tiny_sd1, images, used, "--max-steps", "4", "--set", "output.checkpoint_every=2",
          "--set", "output.keep_checkpoints=3")
    result = runner.invoke(app, [*base, "--out", str(used)])
    assert result.exit_code == 2 and "already holds a run" in result.output and "--overwrite" in result.output
    summary = train(tiny_sd1, images, used, "--max-steps", "2", "--overwrite")
    assert summary["steps"] == 2
    assert sorted(p.name for p in (used / "checkpoints").iterdir()) == ["step-000002"]  # step 4 was the old run's
