"""The offload engine on the CPU: each tier trains exactly like plain AdamW, resumes, and refuses bad set-ups."""

import shutil

import pytest
import torch
from helpers import final_unet, prepared, train

from sdtune import trainer
from sdtune.config import load_config
from sdtune.errors import SdtuneError


def _offload(tier: str, folder) -> list[str]:
    """The `--set` overrides of an optimizer-offload tier; the nvme one keeps its file in `folder`."""
    if tier == "nvme":
        folder.mkdir(parents=True, exist_ok=True)
        return ["memory.optimizer_offload=nvme", f"memory.offload_dir={folder}"]
    return [f"memory.optimizer_offload={tier}"]


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("overrides", [
    [],
    ["train.max_grad_norm=0"],  # the cpu tier steps each bucket during backward
    ["train.gradient_accumulation_steps=2", "train.max_grad_norm=0.05", "train.weight_decay=0.1"],
])
def test_optimizer_offload_equals_plain_adamw(tiny_sd1, images, tmp_path, tier, overrides):
    """fp32 masters, gradients and AdamW state off the device give the losses and weights of plain AdamW."""
    from sdtune.offload import OffloadAdamW

    runs = {}
    for offload in ("none", tier):
        run = prepared(tiny_sd1, images, tmp_path / offload, "train.max_steps=4",
                       *_offload(offload, tmp_path / "state"), *overrides)
        trainer.loop(run, lambda run, sps: None)
        runs[offload] = run
    assert isinstance(runs[tier].optimizer, OffloadAdamW)
    assert runs[tier].optimizer.step_in_backward == (tier == "cpu" and overrides == ["train.max_grad_norm=0"])
    assert all(p.grad is None for p in runs[tier].components.unet.parameters())  # gradients left the device
    assert runs[tier].losses == pytest.approx(runs["none"].losses, rel=1e-5)
    plain, offloaded = runs["none"].components.unet.state_dict(), trainer._fp32_weights(runs[tier])
    for name, weight in plain.items():
        torch.testing.assert_close(offloaded[name], weight, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(runs[tier].components.unet.get_parameter(name).data, weight, rtol=1e-5,
                                   atol=1e-6, msg=name)  # the device copy follows the masters


def test_nvme_tier_keeps_the_state_in_its_file_not_in_memory(tiny_sd1, images, tmp_path):
    run = prepared(tiny_sd1, images, tmp_path / "out", "train.max_steps=2", *_offload("nvme", tmp_path / "state"))
    trainer.loop(run, lambda run, sps: None)
    [folder] = (tmp_path / "state").iterdir()
    params = sum(p.numel() for p in run.components.unet.parameters())
    assert (folder / "optimizer_state.bin").stat().st_size == 12 * params  # master, exp_avg, exp_avg_sq
    assert not run.optimizer.state  # torch's per-parameter state is empty: nothing of it is in RAM
    assert all(b.master.stride() == (0,) for b in run.optimizer._buckets)  # placeholders, not masters
    run.optimizer.close()
    assert not folder.exists()  # the state file goes with the optimizer


@pytest.mark.parametrize("tier", ["cpu", "nvme", "nvme+params"])
def test_optimizer_offload_resumes_exactly_and_exports_fp32(tiny_sd1, images, tmp_path, tier):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    keys = _offload(tier.split("+")[0], tmp_path / "state")
    if tier.endswith("+params"):
        keys += ["memory.param_offload=cpu", "memory.gradient_checkpointing=true"]
    sets = [arg for key in keys for arg in ("--set", key)]
    args = ("--max-steps", "4", "--set", "output.checkpoint_every=2", *sets)
    expected = train(tiny_sd1, images, straight, *args)
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "checkpoints" / "step-000004")
    if tier.startswith("nvme"):
        assert (killed / "checkpoints" / "step-000002" / "optimizer_state.bin").is_file()
    resumed = train(tiny_sd1, images, killed, *args, "--resume")
    assert resumed["losses"] == expected["losses"]
    a, b = final_unet(straight), final_unet(killed)
    assert all(torch.equal(a[k], b[k]) for k in a) and all(v.dtype == torch.float32 for v in a.values())


def test_offload_with_a_non_adamw_optimizer_names_both_keys():
    with pytest.raises(SdtuneError, match="memory.optimizer_offload=cpu.*memory.optimizer=adamw8bit"):
        load_config("cpu", ["memory.optimizer_offload=cpu", "memory.optimizer=adamw8bit"])


@pytest.mark.parametrize("sets, message", [
    (["memory.optimizer_offload=nvme"], "optimizer_offload=nvme needs memory.offload_dir"),
    (["memory.optimizer_offload=cpu", "memory.param_offload=cpu"],
     "param_offload=cpu.*needs memory.gradient_checkpointing=true"),
    (["memory.gradient_checkpointing=true", "memory.param_offload=cpu"],
     "param_offload=cpu.*needs memory.optimizer_offload=cpu or nvme"),
])
def test_offload_contradictions_name_both_keys(sets, message):
    with pytest.raises(SdtuneError, match=message):
        load_config("cpu", sets)


def test_nvme_offload_dir_is_checked_before_step_one(tiny_sd1, images, tmp_path, monkeypatch):
    with pytest.raises(SdtuneError, match="offload_dir .*missing does not exist"):
        prepared(tiny_sd1, images, tmp_path / "o1", "memory.optimizer_offload=nvme",
                 f"memory.offload_dir={tmp_path / 'missing'}")
    (tmp_path / "file").write_text("")
    with pytest.raises(SdtuneError, match="does not exist"):  # a file is not a folder
        prepared(tiny_sd1, images, tmp_path / "o2", "memory.optimizer_offload=nvme",
                 f"memory.offload_dir={tmp_path / 'file'}")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not _writable(locked):  # root ignores permissions; the check still runs, it just passes
        with pytest.raises(SdtuneError, match="is not writable"):
            prepared(tiny_sd1, images, tmp_path / "o3", *_offload("nvme", locked))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(SdtuneError, match=r"has 0.0 GiB free but the optimizer state needs"):
        prepared(tiny_sd1, images, tmp_path / "o4", *_offload("nvme", tmp_path / "state"))


def _writable(folder) -> bool:
    try:
        (folder / "probe").write_text("")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_offload_with_fp16_loss_scaling_skips_overflowing_steps(tiny_sd1, images, tmp_path, tier):
    run = prepared(tiny_sd1, images, tmp_path / "o", "memory.precision=fp16", *_offload(tier, tmp_path / "state"),
                   "train.max_steps=6")
    assert next(run.components.unet.parameters()).dtype == torch.float16  # working precision on the device
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8)
    before = {k: v.clone() for k, v in trainer._fp32_weights(run).items()}
    trainer._micro_step(run, 0)
    assert not trainer._optimizer_step(run)
    assert all(torch.equal(before[k], v) for k, v in trainer._fp32_weights(run).items())
    trainer.loop(run, lambda run, sps: None)
    assert run.skipped_steps >= 1 and all(torch.isfinite(torch.tensor(run.losses)))
    assert any(not torch.equal(before[k], v) for k, v in trainer._fp32_weights(run).items())


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_parameter_streaming_equals_resident_weights(tiny_sd1, images, tmp_path, tier):
    """Weights streamed layer by layer from host memory train exactly like weights kept on the device."""
    from sdtune.offload import ParamStreamer

    common = ["train.max_steps=3", "memory.gradient_checkpointing=true", "train.gradient_accumulation_steps=2",
              *_offload(tier, tmp_path / "state")]
    resident = prepared(tiny_sd1, images, tmp_path / "resident", *common)
    streamed = prepared(tiny_sd1, images, tmp_path / "streamed", *common, "memory.param_offload=cpu",
                        "output.sample_every=3", "output.sample_prompts=['a star']", "output.sample_steps=2")
    assert isinstance(streamed.streamer, ParamStreamer) and resident.streamer is None
    streamed.streamer.lookahead_bytes = 4096  # a few layers ahead, as 64 MB is ahead of an SD1.5 block
    for run in (resident, streamed):
        trainer.loop(run, lambda run, sps: None)
    assert streamed.losses == resident.losses
    a, b = trainer._fp32_weights(resident), trainer._fp32_weights(streamed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    total = sum(p.numel() * p.element_size() for p in streamed.components.unet.parameters())
    assert streamed.streamer.resident_bytes == 0  # after the step every weight is back home
    assert 0 < streamed.streamer.peak_resident_bytes < 0.3 * total  # measured: 15% of the tiny UNet
    assert (tmp_path / "streamed" / "samples" / "step-000003.png").is_file()  # inference streams too


def test_nvme_tier_needs_much_less_host_memory_than_the_cpu_tier(tmp_path):
    """Peak RSS added by 38 M parameters in training, each tier in its own process (bench/offload_tiers.py)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "offload_tiers.py"
    out = subprocess.run([sys.executable, str(script), "--tiers", "cpu,nvme", "--params", "40e6", "--bucket-mb", "8",
                          "--steps", "2", "--dir", str(tmp_path), "--json"], check=True, capture_output=True, text=True)
    cpu, nvme = json.loads(out.stdout)
    # cpu: working copy + master + gradient + 2 moments = 20 B/param; nvme: working copy + gradient + 3 buckets
    assert nvme["added_rss_bytes"] < 0.75 * cpu["added_rss_bytes"]  # measured 0.65
    assert not list(tmp_path.iterdir())  # the state file is gone with the process


def test_without_clipping_the_cpu_tier_steps_during_backward(tiny_sd1, images, tmp_path):
    run = prepared(tiny_sd1, images, tmp_path / "o", "memory.optimizer_offload=cpu", "train.max_grad_norm=0")
    before = {k: v.clone() for k, v in trainer._fp32_weights(run).items()}
    trainer._micro_step(run, 0)  # forward and backward only
    assert all(b.stepped for b in run.optimizer._buckets)
    after_backward = {k: v.clone() for k, v in trainer._fp32_weights(run).items()}
    assert all(not torch.equal(before[k], after_backward[k]) for k in before)
    trainer._optimizer_step(run)  # finds nothing left to do
    assert all(torch.equal(after_backward[k], v) for k, v in trainer._fp32_weights(run).items())
    assert not any(b.stepped for b in run.optimizer._buckets)


def test_a_failed_nvme_write_is_one_clear_error(tiny_sd1, images, tmp_path, monkeypatch):
    import errno
    import os

    run = prepared(tiny_sd1, images, tmp_path / "o", "train.max_steps=2", *_offload("nvme", tmp_path / "state"))

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(SdtuneError, match=r"writing optimizer state to .*optimizer_state.bin failed "
                                          r"\(No space left on device\); free space there"):
        trainer.loop(run, lambda run, sps: None)
