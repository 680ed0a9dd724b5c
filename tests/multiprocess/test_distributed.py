"""Several processes on the CPU: `torchrun --nproc-per-node 2 -m sdtune train` over gloo, one thread each.

Two processes of batch 1 must train what one process of batch 2 trains (DDP and FSDP2), a run whose
rank is killed with SIGKILL resumes to the uninterrupted run's weights, rank 0 alone writes and speaks,
and a refused plan is one line naming both keys (and the rank). The torchrun runs are shared by module
fixtures: each costs ~15 s of start-up on this machine.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.helpers import KEEP_ALL, final_unet, train

from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.plan import resolve_mode
from sdtune.util.world import World

# AdamW's first steps move every weight by about +-lr whatever its gradient's size, so a gradient of ~0
# whose sign rounding flips (the sum over two processes is not the batch's sum, bit for bit) moves by
# 2 x lr: a large epsilon makes the update proportional to the gradient, and the comparison meaningful.
# The noise and loss knobs are on (kohya's recipes): their draws are made for the whole global batch, each
# rank keeping its rows, so several processes still train what one does.
STEPS = ["--max-steps", "4", "--set", "output.checkpoint_every=2", "--set", "output.single_file=false",
         "--set", "train.adam_epsilon=1.0", "--set", "train.multires_noise_iterations=4",
         "--set", "train.ip_noise_gamma=0.1", "--set", "train.noise_offset=0.05",
         "--set", "train.noise_offset_random_strength=true", "--set", "train.loss=huber",
         "--set", "train.min_timestep=100", "--set", "train.debiased_estimation=true"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(model, images, out: Path, *extra, wait=True, logs: Path | None = None):
    """`torchrun --standalone --nproc-per-node 2 -m sdtune train --preset cpu ...`, each rank's output in
    LOGS/<rank>.log (torchrun's --redirects); the finished process, or the running one with wait=False."""
    logs = logs or out.with_name(out.name + "-logs")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--log-dir", str(logs), "--redirects", "3", "-m", "sdtune", "train", "--preset", "cpu",
               "--data", str(images), "--model", str(model), "--out", str(out), *KEEP_ALL, *extra]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    process.output = output
    return process


def rank_output(logs: Path, rank: int) -> str:
    """What rank `rank` printed (stdout and stderr), from torchrun's log folder."""
    return "".join(p.read_text() for p in sorted(logs.rglob(f"attempt_*/{rank}/*.log")))


@pytest.fixture(scope="module")
def single(tiny_sd1, images, tmp_path_factory):
    """One process, batch 2: what every two-process run must equal."""
    out = tmp_path_factory.mktemp("single") / "out"
    return out, train(tiny_sd1, images, out, *STEPS, "--set", "train.batch_size=2")


@pytest.fixture(scope="module")
def ddp(tiny_sd1, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    process = torchrun(tiny_sd1, images, out, *STEPS, "--set", "train.batch_size=1")
    assert process.returncode == 0, process.output
    return out, process


def _assert_same_training(out: Path, single, model: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    reference, expected = single
    assert summary["processes"] == 2 and summary["global_batch"] == 2
    assert summary["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    a, b, base = final_unet(reference), final_unet(out), final_unet(model)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-7
    moved = sum((a[k] - base[k]).square().sum() for k in a).sqrt()
    assert sum((a[k] - b[k]).square().sum() for k in a).sqrt() < 1e-3 * moved  # the updates agree to 0.1%


def test_two_ddp_processes_of_batch_1_train_what_one_process_of_batch_2_trains(ddp, single, tiny_sd1):
    out, _ = ddp
    _assert_same_training(out, single, tiny_sd1)
    assert json.loads((out / "summary.json").read_text())["distributed"] == "ddp"


def test_only_rank_0_writes_and_speaks(ddp, single):
    out, process = ddp
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    reference = sorted(p.relative_to(single[0]).as_posix() for p in single[0].rglob("*") if p.is_file())
    assert files == reference  # the same folder as one process writes: no rank's extra or duplicate files
    logs = out.with_name(out.name + "-logs")
    assert "done: 4 steps" in rank_output(logs, 0) and "images from" in rank_output(logs, 0)
    quiet = rank_output(logs, 1)
    for line in ("done:", "images from", "step 4/4", "diffusers pipeline written"):
        assert line not in quiet, quiet


@pytest.fixture(scope="module")
def fsdp(tiny_sd1, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "out"
    process = torchrun(tiny_sd1, images, out, *STEPS, *FSDP)
    assert process.returncode == 0, process.output
    return out


FSDP = ["--set", "train.batch_size=1", "--set", "memory.distributed=fsdp"]


def test_two_fsdp_processes_shard_the_unet_and_train_the_same(fsdp, tiny_sd1, single):
    out = fsdp
    _assert_same_training(out, single, tiny_sd1)
    checkpoint = out / "checkpoints" / "step-000004"
    assert (checkpoint / "sharded" / ".metadata").is_file()  # torch.distributed.checkpoint, both ranks' shards
    assert not (checkpoint / "unet.safetensors").exists()
    manifest = json.loads((checkpoint / "state.json").read_text())["manifest"]
    assert sum(name.startswith("sharded/") for name in manifest) >= 3  # the metadata and one file per rank


def test_each_fsdp_rank_builds_the_unet_on_the_meta_device_and_reads_only_its_shards(fsdp):
    said = rank_output(fsdp.with_name(fsdp.name + "-logs"), 0)
    line = next((line for line in said.splitlines() if "built on the meta device" in line), None)
    assert line is not None, said
    shares = [float(share) for share in re.findall(r"rank \d ([\d.]+)%", line)]
    assert len(shares) == 2 and sum(shares) == pytest.approx(100, abs=0.2)  # together the UNet, once
    assert max(shares) < 55  # each about half: no rank read (or held) the whole UNet


def test_a_sharded_checkpoint_resumes_bit_for_bit(fsdp, tiny_sd1, images, tmp_path):
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    for written in ("unet", "summary.json"):
        shutil.rmtree(resumed / written) if (resumed / written).is_dir() else (resumed / written).unlink()
    process = torchrun(tiny_sd1, images, resumed, *STEPS, *FSDP, "--resume")
    assert process.returncode == 0, process.output
    assert "resumed from" in rank_output(resumed.with_name("resumed-logs"), 0)
    expected, got = (json.loads((folder / "summary.json").read_text()) for folder in (fsdp, resumed))
    assert got["losses"] == expected["losses"]
    a, b = final_unet(fsdp), final_unet(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_trains_under_ddp_as_in_one_process(tiny_sd1, images, tmp_path):
    from safetensors.torch import load_file

    lora = ["--set", "train.method=lora", "--set", "lora.rank=4"]
    one = train(tiny_sd1, images, tmp_path / "one", *STEPS, *lora, "--set", "train.batch_size=2")
    process = torchrun(tiny_sd1, images, tmp_path / "two", *STEPS, *lora, "--set", "train.batch_size=1")
    assert process.returncode == 0, process.output
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    a, b = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(item[5:]) for item in env if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_a_rank_killed_with_sigkill_stops_the_job_and_resume_ends_as_the_uninterrupted_run(
        tiny_sd1, images, tmp_path, ddp):
    out = tmp_path / "out"
    args = [*STEPS, "--set", "train.batch_size=1", "--set", "output.keep_checkpoints=5"]
    process = torchrun(tiny_sd1, images, out, *args, wait=False)
    first = out / "checkpoints" / "step-000002" / "state.json"
    deadline = time.monotonic() + 300
    while not first.is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
    victim = next(pid for pid in _children(process.pid) if _rank_of(pid) == 1)
    os.kill(victim, signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0, output
    assert not (out / "summary.json").exists()
    resumed = torchrun(tiny_sd1, images, out, *args, "--resume", logs=tmp_path / "resumed-logs")
    assert resumed.returncode == 0, resumed.output
    assert "resumed from" in rank_output(tmp_path / "resumed-logs", 0)
    expected, got = json.loads((ddp[0] / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert got["losses"] == expected["losses"]
    a, b = final_unet(ddp[0]), final_unet(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_refused_plan_is_one_line_naming_both_keys_and_the_rank(tiny_sd1, images, tmp_path):
    process = torchrun(tiny_sd1, images, tmp_path / "out", "--max-steps", "1",
                       "--set", "memory.optimizer_offload=cpu")
    assert process.returncode != 0
    logs = tmp_path / "out-logs"
    for rank in (0, 1):
        lines = [line for line in rank_output(logs, rank).splitlines() if line.startswith("error:")]
        assert len(lines) == 1, rank_output(logs, rank)
        assert lines[0].startswith(f"error: rank {rank}: memory.distributed (auto)=ddp")
        assert "memory.optimizer_offload=cpu" in lines[0]


@pytest.mark.parametrize(("sets", "keys"), [
    (["memory.distributed=ddp", "memory.optimizer_offload=nvme", "memory.offload_dir=/tmp"],
     "memory.optimizer_offload=nvme"),
    (["memory.distributed=ddp", "memory.param_offload=cpu", "memory.gradient_checkpointing=true",
      "memory.optimizer_offload=cpu"], "memory.optimizer_offload=cpu"),
    (["memory.distributed=fsdp", "memory.precision=fp16"], "fp16"),
    (["memory.distributed=fsdp", "memory.optimizer=adamw8bit"], "memory.optimizer=adamw8bit"),
    (["memory.distributed=fsdp", "memory.optimizer_offload=nvme", "memory.offload_dir=/tmp"],
     "memory.optimizer_offload=nvme"),
    (["memory.distributed=fsdp", "train.method=lora"], "train.method=lora"),
    (["memory.distributed=ddp", "train.method=lora", "lora.text_encoder=true", "data.cache_text=false"],
     "lora.text_encoder=true"),
])
def test_refused_combinations_name_both_keys_in_one_process_too(sets, keys):
    cfg, _ = load_config("cpu", sets)
    with pytest.raises(SdtuneError) as refused:
        resolve_mode(cfg, World())
    message = str(refused.value)
    assert sets[0] in message and keys in message and "\n" not in message


def test_what_each_setting_runs():
    two = World(rank=1, size=2, local_rank=1)
    assert resolve_mode(load_config("cpu", [])[0], World()) == "none"
    assert resolve_mode(load_config("cpu", [])[0], two) == "ddp"
    assert resolve_mode(load_config("cpu", ["memory.distributed=fsdp",
                                                     "memory.optimizer_offload=cpu"])[0], two) == "fsdp"
    assert resolve_mode(load_config("cpu", ["memory.distributed=fsdp"])[0], World()) == "none"
    # a preset with sdtune's own offload runs as it is in one process, and is refused under torchrun
    offloaded = load_config("cpu", ["memory.optimizer_offload=cpu"])[0]
    assert resolve_mode(offloaded, World()) == "none"
    with pytest.raises(SdtuneError, match="memory.optimizer_offload=cpu"):
        resolve_mode(offloaded, two)
    with pytest.raises(SdtuneError, match="started 2 processes but memory.distributed=none"):
        resolve_mode(load_config("cpu", ["memory.distributed=none"])[0], two)


def test_each_rank_takes_its_equal_share_of_a_global_batch():
    items = list(range(6))
    shares = [World(rank=r, size=3).share(items) for r in range(3)]
    assert shares == [[0, 1], [2, 3], [4, 5]]
    assert [items[World(rank=r, size=3).slice(6)] for r in range(3)] == shares
    assert World().share(items) == items and World.from_env({}) == World()
    assert World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)


def test_a_checkpoint_resumes_only_on_the_world_size_that_wrote_it(ddp, tiny_sd1, images):
    out, _ = ddp
    result = subprocess.run([sys.executable, "-m", "sdtune", "train", "--preset", "cpu", "--data", str(images),
                             "--model", str(tiny_sd1), "--out", str(out), *STEPS, "--set", "train.batch_size=1",
                             "--max-steps", "6", "--resume"], env=ENV, capture_output=True, text=True)
    assert result.returncode == 2
    assert "was written by 2 processes and this run has 1; resume it with 2 processes" in result.stderr


def test_accelerate_launch_starts_the_same_run(tiny_sd1, images, tmp_path, ddp):
    """`accelerate launch --multi_gpu --num_processes 2 -m sdtune train` (on a machine without GPUs its
    multi-process launcher needs --multi_gpu; with GPUs it is the default): the torchrun run's losses."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "-m", "sdtune", "train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
               "--out", str(out), *STEPS, "--set", "train.batch_size=1"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    got, expected = (json.loads((folder / "summary.json").read_text()) for folder in (out, ddp[0]))
    assert got["processes"] == 2 and got["losses"] == expected["losses"]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_with_a_checkpoint(tiny_sd1, images, tmp_path):
    out = tmp_path / "out"
    args = ["--max-steps", "40", "--set", "output.checkpoint_every=0", "--set", "output.single_file=false",
            "--set", "train.batch_size=1"]
    process = torchrun(tiny_sd1, images, out, *args, wait=False)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
    os.kill(next(pid for pid in _children(process.pid) if _rank_of(pid) == 1), signal.SIGTERM)
    process.communicate(timeout=300)
    saved = list((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "state.json").is_file()
    logs = out.with_name("out-logs")
    assert f"stopped after step {int(saved[0].name[5:])}" in rank_output(logs, 0)
    assert "resume with: sdtune train" in rank_output(logs, 0) and "(under the launcher, 2 processes)" in \
        rank_output(logs, 0)
    assert "resume with" not in rank_output(logs, 1)  # rank 0 speaks for the run


def test_fsdp_in_bf16_with_cpu_offload_trains_as_one_bf16_process(tiny_sd1, images, tmp_path):
    """FSDP2's mixed-precision policy (bf16 compute, fp32 reduction) and CPUOffloadPolicy
    (`memory.optimizer_offload=cpu`): the losses of one process training in bf16 under autocast."""
    bf16 = ["--set", "memory.precision=bf16"]
    one = train(tiny_sd1, images, tmp_path / "one", *STEPS, *bf16, "--set", "train.batch_size=2")
    process = torchrun(tiny_sd1, images, tmp_path / "two", *STEPS, *bf16, *FSDP,
                       "--set", "memory.optimizer_offload=cpu")
    assert process.returncode == 0, process.output
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["distributed"] == "fsdp" and two["precision"] == "bf16"
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3)

