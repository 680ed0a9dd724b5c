"""The offload engine on the CPU: each tier trains exactly like plain AdamW, resumes, and refuses bad set-ups."""

import dataclasses
import shutil

import pytest
import torch
from support.helpers import final_unet, prepared, train

from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.optim.tier import clip_gradients
from sdtune.train import checkpoint as run_checkpoint
from sdtune.train import loop as trainer


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
        trainer.loop(run)
        runs[offload] = run
    assert isinstance(runs[tier].optimizer, OffloadAdamW)
    assert runs[tier].optimizer.step_in_backward == (tier == "cpu" and overrides == ["train.max_grad_norm=0"])
    assert all(p.grad is None for p in runs[tier].components.unet.parameters())  # gradients left the device
    assert runs[tier].losses == runs["none"].losses
    plain, offloaded = runs["none"].components.unet.state_dict(), trainer.fp32_weights(runs[tier])
    for name, weight in plain.items():  # the same fp32 operations in the same order: equal bit for bit
        assert torch.equal(offloaded[name], weight), name
        assert torch.equal(runs[tier].components.unet.get_parameter(name).data, weight), name  # the device copy


def test_nvme_tier_keeps_the_state_in_its_file_not_in_memory(tiny_sd1, images, tmp_path):
    run = prepared(tiny_sd1, images, tmp_path / "out", "train.max_steps=2", *_offload("nvme", tmp_path / "state"))
    trainer.loop(run)
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
    with pytest.raises(SdtuneError, match=r"not enough disk space for the optimizer state \(memory.offload_dir\) in "
                                          r".*state: it needs .* and 1 KiB is free; free space there or set "):
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
    run = dataclasses.replace(run, scaler=run.tier.make_scaler("cpu", enabled=True, init_scale=2.0**40,
                                                               backoff_factor=2.0**-8))
    before = {k: v.clone() for k, v in trainer.fp32_weights(run).items()}
    assert not trainer.train_step(run).stepped
    assert all(torch.equal(before[k], v) for k, v in trainer.fp32_weights(run).items())
    trainer.loop(run)
    assert run.skipped_steps >= 1 and all(torch.isfinite(torch.tensor(run.losses)))
    assert any(not torch.equal(before[k], v) for k, v in trainer.fp32_weights(run).items())


def test_nvme_tier_needs_much_less_host_memory_than_the_cpu_tier(tmp_path):
    """Peak RSS added by 38 M parameters in training, each tier in its own process (bench/offload_tiers.py)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "bench" / "offload_tiers.py"
    out = subprocess.run([sys.executable, str(script), "--tiers", "cpu,nvme", "--params", "40e6", "--bucket-mb", "8",
                          "--steps", "2", "--dir", str(tmp_path), "--json"], check=True, capture_output=True, text=True)
    cpu, nvme = json.loads(out.stdout)
    # cpu: working copy + master + gradient + 2 moments = 20 B/param; nvme: working copy + gradient + 3 buckets
    assert nvme["added_rss_bytes"] < 0.75 * cpu["added_rss_bytes"]  # measured 0.65
    assert not list(tmp_path.iterdir())  # the state file is gone with the process


def test_without_clipping_the_cpu_tier_steps_during_backward(tiny_sd1, images, tmp_path):
    run = prepared(tiny_sd1, images, tmp_path / "o", "memory.optimizer_offload=cpu", "train.max_grad_norm=0")
    before = {k: v.clone() for k, v in trainer.fp32_weights(run).items()}
    trainer.micro_step(run, 0)  # forward and backward only
    assert all(b.stepped for b in run.optimizer._buckets)
    after_backward = {k: v.clone() for k, v in trainer.fp32_weights(run).items()}
    assert all(not torch.equal(before[k], after_backward[k]) for k in before)
    trainer.optimizer_step(run)  # finds nothing left to do
    assert all(torch.equal(after_backward[k], v) for k, v in trainer.fp32_weights(run).items())
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
        trainer.loop(run)


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize(("accumulation", "host_weights"), [(1, False), (2, False), (1, True)])
def test_the_host_byte_model_is_what_the_tier_allocates(tmp_path, tier, accumulation, host_weights):
    """`host_bytes` (the estimator's host-RAM row) against the storages the tier really holds."""
    from sdtune.offload import NvmeAdamW, OffloadAdamW

    model = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.Linear(700, 900), torch.nn.Linear(900, 5))
    numels = [p.numel() for p in model.parameters()]
    kind, extra = (NvmeAdamW, {"offload_dir": str(tmp_path)}) if tier == "nvme" else (OffloadAdamW, {})
    opt = kind(model.parameters(), device="cpu", dtype=torch.bfloat16, lr=1e-3, bucket_mb=1,
               accumulation_steps=accumulation, host_weights=host_weights, **extra)
    held = [opt._scratch, opt._staging.tensor, opt._small.tensor, opt._weights and opt._weights.tensor,
            *getattr(opt, "_ring", [])]
    for bucket in opt._buckets:
        held += [bucket.grad] + ([bucket.master] if tier == "cpu" else [])
    held += [t for state in opt.state.values() for t in state.values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held if t is not None}
    steps = 4 * len(opt._buckets) if tier == "cpu" else 0  # AdamW's step counts, one float a bucket
    assert len(opt._buckets) == 2  # 1 MiB buckets close once full: [w1, b1, w2] and [b2, w3, b3]
    assert sum(storages.values()) - steps == kind.host_bytes(numels, itemsize=2, accumulation_steps=accumulation,
                                                             host_weights=host_weights, bucket_mb=1)


class _FailOnce(torch.autograd.Function):
    """Identity forward; the first backward raises, as an out-of-memory error halfway through would."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if _FailOnce.armed:
            _FailOnce.armed = False
            raise RuntimeError("boom")
        return grad


def _toy(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))


def _toy_step(model, optimizer, x, fail: bool = False) -> float:
    hidden = model[1](model[0](x))
    _FailOnce.armed = fail
    loss = model[2](_FailOnce.apply(hidden)).square().sum()
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_a_backward_that_raises_leaves_no_state_behind(step_in_backward):
    """The first layer's gradients have arrived when backward fails; the next backward starts clean."""
    from sdtune.offload import OffloadAdamW

    x = torch.randn(2, 3, 8, 8)
    plain, offloaded = _toy(), _toy()
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=True)
    clip = 0.0 if step_in_backward else 1.0  # clipping uses the norm: none of the failed pass's may count
    opt = OffloadAdamW(offloaded.parameters(), device="cpu", dtype=torch.float32, lr=1e-2, bucket_mb=1,
                       step_in_backward=step_in_backward, max_grad_norm=clip)
    with pytest.raises(RuntimeError, match="boom"):
        _toy_step(offloaded, opt, x * 100, fail=True)  # the last layer's gradient is in, the others never come
    if not step_in_backward:
        with pytest.raises(RuntimeError, match="did not finish"):
            opt.step()
    _toy_step(offloaded, opt, x)
    opt.step()
    _toy_step(plain, reference, x)
    if clip:
        assert clip_gradients(reference, clip) > clip
    reference.step()
    for name, weight in plain.state_dict().items():
        assert torch.equal(opt.master_weights(offloaded)[name], weight), name


def test_an_overflow_anywhere_is_seen_by_the_host_gradient_scaler():
    """fp16 with host gradients: one inf in the first element of one gradient skips the step, backs the
    scale off and leaves the masters as they were; GradScaler.unscale_ is refused."""
    from sdtune.offload import OffloadAdamW
    from sdtune.offload.scaler import HostGradScaler

    model = _toy()
    opt = OffloadAdamW(model.parameters(), device="cpu", dtype=torch.float16, lr=1e-2, max_grad_norm=1.0)
    scaler = HostGradScaler("cpu", init_scale=2.0**10)
    before = {k: v.clone() for k, v in opt.master_weights(model).items()}
    model[2].bias.register_hook(lambda grad: torch.cat([torch.full_like(grad[:1], float("inf")), grad[1:]]))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float16)
    scaler.scale(model(x).float().square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.skipped and scaler.get_scale() == 2.0**9
    assert all(torch.equal(before[k], v) for k, v in opt.master_weights(model).items())
    with pytest.raises(RuntimeError, match="unscale and clip inside their step"):
        scaler.unscale_(opt)


def test_host_memory_that_cannot_be_had_is_one_clear_line(monkeypatch):
    """A refused page-lock (cudaHostRegister's error code) or a failed host allocation is HostOutOfMemory,
    naming the nvme lever, not a generic CUDA or allocator error."""
    import types

    from sdtune.errors import HostOutOfMemory
    from sdtune.offload import pinned

    refusing = types.SimpleNamespace(cudaHostRegister=lambda ptr, size, flags: 2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: refusing)
    with pytest.raises(HostOutOfMemory, match=r"^host RAM exhausted: page-locking 0\.25 GiB failed \(cudaHostRegister "
                                              r"returned error 2 \(cudaErrorMemoryAllocation\)\); "
                                              r".*--set memory.optimizer_offload=nvme"):
        pinned.PinnedBuffer(2**27, torch.bfloat16, pin=True)

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 13743895347 bytes.")

    monkeypatch.setattr(torch, "zeros", no_memory)
    with pytest.raises(HostOutOfMemory, match=r"allocating 12\.81 GiB failed \(DefaultCPUAllocator"):
        pinned.host_empty(859_520_964 * 4, torch.float32, zero=True)


def test_stepping_in_backward_stops_at_an_inf_gradient():
    """Without clipping or loss scaling each bucket steps as its gradients arrive; an inf gradient stops
    that before the bucket changes, and the step is reported skipped. The next step is clean."""
    from sdtune.offload import OffloadAdamW

    model, x = _toy(), torch.randn(2, 3, 8, 8)
    opt = OffloadAdamW(model.parameters(), device="cpu", dtype=torch.float32, lr=1e-2, step_in_backward=True)
    before = {k: v.clone() for k, v in opt.master_weights(model).items()}
    hook = model[2].bias.register_hook(lambda grad: grad * float("inf"))
    _toy_step(model, opt, x)
    opt.step()
    assert opt.skipped and all(torch.equal(before[k], v) for k, v in opt.master_weights(model).items())
    hook.remove()
    _toy_step(model, opt, x)
    opt.step()
    assert not opt.skipped and all(not torch.equal(before[k], v) for k, v in opt.master_weights(model).items())


def test_a_step_that_overlaps_the_next_forward_changes_no_number(monkeypatch):
    """overlap_step: step() returns once the norm is known and the worker steps the buckets, each block of
    the model waiting for its own before it runs. With every bucket's step slowed down, the next forward
    still sees the new weights: losses and weights equal plain AdamW's bit for bit."""
    import time

    from sdtune.offload import OffloadAdamW, overlap

    monkeypatch.setattr(overlap, "GATE_BYTES", 4000)  # the conv and the linear layer wait apart
    slow_step = OffloadAdamW._step_bucket

    def slowly(self, *args):
        time.sleep(0.05)
        slow_step(self, *args)

    monkeypatch.setattr(OffloadAdamW, "_step_bucket", slowly)
    x = torch.randn(2, 3, 8, 8)
    plain, offloaded = _toy(), _toy()
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=True)
    opt = OffloadAdamW(offloaded.parameters(), device="cpu", dtype=torch.float32, lr=1e-2, bucket_mb=0.001,
                       max_grad_norm=1.0, model=offloaded, overlap_step=True)
    assert opt.overlap_step and len(opt._buckets) == 2
    for _ in range(3):
        assert _toy_step(offloaded, opt, x) == _toy_step(plain, reference, x)
        opt.step()
        assert any(not b.ready.is_set() for b in opt._buckets)  # step() returned before the worker was done
        clip_gradients(reference, 1.0)
        reference.step()
        reference.zero_grad()
    for name, weight in plain.state_dict().items():
        assert torch.equal(opt.master_weights(offloaded)[name], weight), name


def test_the_overlapped_step_trains_the_unet_as_plain_adamw_does(tiny_sd1, images, tmp_path, monkeypatch):
    """The CUDA default (the host step overlapping the next forward), forced on the CPU through the loop,
    with validation samples and a checkpoint in between: the same losses and weights as plain AdamW."""
    from sdtune.offload import OffloadAdamW, overlap

    monkeypatch.setitem(OffloadAdamW.__init__.__kwdefaults__, "overlap_step", True)
    monkeypatch.setattr(overlap, "GATE_BYTES", 2**16)  # the tiny UNet in blocks, as SD1.5 is at 128 MiB
    runs = {}
    for offload in ("none", "cpu"):
        run = prepared(tiny_sd1, images, tmp_path / offload, "train.max_steps=4", f"memory.optimizer_offload={offload}",
                       "output.sample_every=2", "output.sample_prompts=['a star']", "output.sample_steps=2",
                       "output.checkpoint_every=3", "train.weight_decay=0.1")
        trainer.loop(run)
        runs[offload] = run
    assert runs["cpu"].optimizer.overlap_step
    assert runs["cpu"].losses == runs["none"].losses
    plain, offloaded = runs["none"].components.unet.state_dict(), trainer.fp32_weights(runs["cpu"])
    assert all(torch.equal(offloaded[name], weight) for name, weight in plain.items())


def _resumed(model, images, out, *overrides):
    """A run prepared with --resume from the newest checkpoint in `out`."""
    cfg, info = load_config("cpu", [f"model.pretrained={model}", *overrides])
    return trainer.prepare(cfg, info, str(images), str(out), resume=True)


def test_resuming_the_host_tier_reads_its_state_into_its_own_buffers(tiny_sd1, images, tmp_path):
    """Resume fits where training fits: the host tier's masters and moments are read from the checkpoint's
    state file into the buffers it trains with (not unpickled beside them), and the weights it restores
    are those masters, not a second copy read from unet.safetensors."""
    from sdtune.train import store as checkpoint

    sets = ["train.max_steps=2", "output.checkpoint_every=2", "memory.optimizer_offload=cpu"]
    first = prepared(tiny_sd1, images, tmp_path / "first", *sets)
    trainer.loop(first)
    saved = checkpoint.checkpoint_root(tmp_path / "first") / "step-000002"
    pickled = torch.load(saved / "training_state.pt", weights_only=True)["optimizer"]
    assert all(t.numel() == 1 for s in pickled["state"].values() for t in s.values())  # step counts only
    run = prepared(tiny_sd1, images, tmp_path / "second", *sets)
    opt = run.optimizer
    buffers = [t for b in opt._buckets for t in (b.master, opt.state[b.master]["exp_avg"],
                                                 opt.state[b.master]["exp_avg_sq"])]
    where = [t.data_ptr() for t in buffers]
    restored = {}

    def restore(weights):
        restored.update(weights)
        run.placement.restore(weights)

    parts = {**run_checkpoint.parts(run), "unet.safetensors": checkpoint.Part(run.placement.weights, restore)}
    checkpoint.load_checkpoint(saved, parts=parts)
    assert [t.data_ptr() for t in buffers] == where  # filled in place
    expected = first.optimizer.state_dict()
    for b, master, before in zip(opt._buckets, expected["masters"], expected["state"].values(), strict=True):
        assert torch.equal(b.master, master)
        assert all(torch.equal(opt.state[b.master][k], before[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    masters = {b.master.untyped_storage().data_ptr() for b in opt._buckets}
    assert restored and all(w.untyped_storage().data_ptr() in masters for w in restored.values())
    unet = run.components.unet
    assert all(torch.equal(unet.get_parameter(name).data, w) for name, w in restored.items())  # the working copy


@pytest.mark.parametrize("before, after", [("none", "cpu"), ("cpu", "none")])
def test_resume_moves_the_optimizer_state_between_the_device_and_host_tiers(tiny_sd1, images, tmp_path,
                                                                            before, after):
    """A checkpoint of either tier (the host tier's state in its file) resumes on the other, training on as
    the unchanged run does (to float rounding: the state is regrouped)."""
    sets = ["train.max_steps=4", "output.checkpoint_every=2"]
    straight = prepared(tiny_sd1, images, tmp_path / "straight", *sets, f"memory.optimizer_offload={after}")
    trainer.loop(straight)
    first = prepared(tiny_sd1, images, tmp_path / "moved", "train.max_steps=2", *sets[1:],
                     f"memory.optimizer_offload={before}")
    trainer.loop(first)
    moved = _resumed(tiny_sd1, images, tmp_path / "moved", *sets, f"memory.optimizer_offload={after}")
    assert moved.step == 2
    trainer.loop(moved)
    assert moved.losses == pytest.approx(straight.losses, rel=1e-5)
    a, b = trainer.fp32_weights(straight), trainer.fp32_weights(moved)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


class _Cudart:
    """CUDA's host registration as the runtime does it: whole pages, each page registered once (712 for a
    page already registered); `refuse` makes every registration fail with that code."""

    def __init__(self, refuse: int = 0):
        self.refuse, self.pages, self.ranges = refuse, set(), []

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (CUDA's name)
        self.ranges.append((ptr, size))
        pages = set(range(ptr // 4096, (ptr + size - 1) // 4096 + 1))
        if self.refuse or pages & self.pages:
            return self.refuse or 712
        self.pages |= pages
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        return 0


@pytest.fixture
def cudart(monkeypatch):
    """A fake CUDA runtime for `PinnedBuffer`, and a record of the pending errors it cleared."""
    from sdtune.offload import pinned

    fake = _Cudart()
    fake.cleared = 0

    def clear():
        fake.cleared += 1

    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(pinned, "clear_cuda_error", clear, raising=False)
    monkeypatch.setattr(pinned, "PAGE", 4096, raising=False)
    return fake


def test_pinned_buffers_register_whole_pages_of_their_own(cudart):
    """Small buffers side by side (the engine's small-gradient and norm buffers) each register whole pages
    that no other buffer shares: CUDA's 712 for a page registered twice cannot happen."""
    from sdtune.offload.pinned import PinnedBuffer

    buffers = [PinnedBuffer(n, torch.bfloat16, pin=True) for n in (3, 100, 2047, 2048, 5000, 1, 77) * 8]
    assert all(b.how == "registered" for b in buffers)
    for (ptr, size), b in zip(cudart.ranges, buffers, strict=True):
        assert ptr % 4096 == 0 and size % 4096 == 0 and size >= b.nbytes  # whole pages
        assert ptr <= b.tensor.data_ptr() and b.tensor.data_ptr() + b.nbytes <= ptr + size
        assert b.tensor.numel() == b.nbytes // 2 and b.tensor.dtype == torch.bfloat16
    b.tensor.fill_(1.5)  # the buffer is usable memory of its own
    assert len(cudart.pages) == sum(size // 4096 for _, size in cudart.ranges)  # no page twice


@pytest.mark.parametrize("code", [800, 801])  # cudaErrorNotPermitted, cudaErrorNotSupported
def test_a_refused_registration_falls_back_to_pinned_allocation(cudart, monkeypatch, code):
    """Where the machine refuses to register host memory (some virtualised ones), the buffer comes from
    torch's pinned allocator instead, the pending CUDA error is cleared, and `how` says which path ran."""
    from sdtune.offload.pinned import PinnedBuffer

    cudart.refuse = code
    real_empty, pinned_sizes = torch.empty, []

    def empty(*size, pin_memory=False, **kwargs):
        if pin_memory:
            pinned_sizes.append(size)
        return real_empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    buffer = PinnedBuffer(1000, torch.float16, pin=True)
    assert buffer.how == "pin_memory" and pinned_sizes == [(1000,)] and cudart.cleared == 1
    assert buffer.tensor.shape == (1000,) and buffer.tensor.dtype == torch.float16
    assert PinnedBuffer(1000, torch.float16, pin=False).how == "pageable"


@pytest.mark.parametrize("code", [0, 800])  # registered in place; refused: moved to torch's pinned allocator
def test_streamed_host_weights_are_pinned_once_the_fp32_parameters_are_gone(cudart, monkeypatch, code):
    """With `host_weights` (weight streaming), the working weights are page-locked only after every fp32
    parameter has been replaced by its view of them (a page-locked buffer is resident whole: beside the
    whole fp32 UNet it was SDXL's host peak); where registration is refused the buffer moves with its values,
    and every parameter and bucket follows it."""
    from sdtune.offload import OffloadAdamW, optimizer, pinned

    real = pinned.PinnedBuffer
    monkeypatch.setattr(optimizer, "PinnedBuffer", lambda numel, dtype, pin, **kw: real(numel, dtype, pin=True, **kw))
    model = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.Linear(700, 900))
    fp32 = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = []

    def register(ptr, size, flags):  # the fp32 parameters still alive when a buffer is page-locked
        seen.append([p.dtype for p in model.parameters()])
        return _Cudart.cudaHostRegister(cudart, ptr, size, flags)

    cudart.refuse, cudart.cudaHostRegister = code, register
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *size, pin_memory=False, **kw: real_empty(*size, **kw))
    opt = OffloadAdamW(model.parameters(), device="cpu", dtype=torch.bfloat16, lr=1e-3, bucket_mb=1, host_weights=True)
    assert seen[0] == [torch.bfloat16] * 4  # the host weights, registered first, after the last fp32 parameter
    assert opt._weights.how == ("pin_memory" if code else "registered")
    buffer = opt._weights.tensor
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p.data, fp32[name].to(torch.bfloat16))
        assert buffer.data_ptr() <= p.data_ptr() < buffer.data_ptr() + opt._weights.nbytes  # a view of the buffer
    assert all(b.device_flat.data_ptr() >= buffer.data_ptr() for b in opt._buckets)
    model(torch.ones(2, 300, dtype=torch.bfloat16)).square().sum().backward()
    opt.step()
    assert all(not torch.equal(p.data, fp32[name].to(torch.bfloat16)) for name, p in model.named_parameters())


def test_the_tier_says_how_its_host_buffers_are_pinned(tiny_sd1, images, tmp_path):
    run = prepared(tiny_sd1, images, tmp_path / "out", "memory.optimizer_offload=cpu")
    assert run.tier.host_pinning == "pageable"  # a CPU run copies nothing over PCIe
    from support.helpers import train

    summary = train(tiny_sd1, images, tmp_path / "run", "--max-steps", "1", "--set", "memory.optimizer_offload=cpu")
    assert summary["host_pinning"] == "pageable"  # summary.json says which path ran
    assert train(tiny_sd1, images, tmp_path / "plain", "--max-steps", "1")["host_pinning"] is None  # no host buffers


def test_a_cuda_error_that_is_not_host_ram_is_reported_as_itself(cudart):
    from sdtune.errors import HostOutOfMemory
    from sdtune.offload.pinned import PinnedBuffer

    cudart.refuse = 1
    with pytest.raises(SdtuneError, match=r"page-locking 0\.00 GiB of host memory failed: cudaHostRegister returned "
                                          r"error 1 \(cudaErrorInvalidValue\); that is the CUDA driver") as error:
        PinnedBuffer(1000, torch.float16, pin=True)
    assert not isinstance(error.value, HostOutOfMemory) and cudart.cleared == 1


def test_the_cuda_runtimes_whose_pending_error_is_cleared_are_found_in_the_process_maps():
    from sdtune.offload.pinned import cudart_paths

    maps = """7f00-7f01 r--p 00000000 08:01 1 /venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so
7f02-7f03 r-xp 00000000 08:01 2 /venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12
7f03-7f04 r--p 00010000 08:01 2 /venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12
7f05-7f06 r-xp 00000000 08:01 3 /opt/torch/lib/libcudart-9335f6a2.so.11.0 (deleted)
7f07-7f08 rw-p 00000000 00:00 0
"""
    assert cudart_paths(maps) == ["/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12",
                                  "/opt/torch/lib/libcudart-9335f6a2.so.11.0"]


def test_a_host_tier_checkpoint_with_its_state_in_the_pickle_still_resumes(tiny_sd1, images, tmp_path):
    """Checkpoints written before the state file (masters and moments inside training_state.pt) load as before."""
    from sdtune.train import store as checkpoint

    sets = ["train.max_steps=2", "output.checkpoint_every=2", "memory.optimizer_offload=cpu"]
    first = prepared(tiny_sd1, images, tmp_path / "first", *sets)
    trainer.loop(first)
    saved = checkpoint.checkpoint_root(tmp_path / "first") / "step-000002"
    training = torch.load(saved / "training_state.pt", weights_only=True)
    torch.save({**training, "optimizer": first.optimizer.state_dict()}, saved / "training_state.pt")
    (saved / "optimizer_state.bin").unlink()
    run = prepared(tiny_sd1, images, tmp_path / "second", *sets)
    checkpoint.load_checkpoint(saved, parts=run_checkpoint.parts(run))
    expected, loaded = first.optimizer.state_dict(), run.optimizer.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(loaded["masters"], expected["masters"], strict=True))
    assert all(torch.equal(loaded["state"][i][k], expected["state"][i][k])
               for i in expected["state"] for k in ("exp_avg", "exp_avg_sq"))
