"""The optimizer tier's CUDA branches on the CPU under fake streams (tests/support/fake_cuda.py): gradients
leave on the gradient stream, the host steps, weights return on the upload stream, with the step overlapping
the next forward or inside backward, accumulation, clipping, the moving average and checkpoint loads. Each run
has no unordered access (`fake.violations`) and trains bit for bit as the synchronous CPU run. Deleting any
one wait, event record or `record_stream` of the tier makes one of these fail: `tests/support/mutate_waits.py`
shows which.
"""

from contextlib import nullcontext

import pytest
import torch
from support.fake_cuda import FakeCuda

from sdtune.offload import overlap
from sdtune.offload.optimizer import OffloadAdamW

# 4096 fp32 values: a weight forward never uses; the first weight alone; a bias, the norm and a weight, with
# small gradients last in; a bias and the last weight, whose gradient is the first to leave (and the last upload)
BUCKET_MB = 1 / 64


class _Trouble(torch.autograd.Function):
    """Identity whose backward raises (`mode` "raise") or returns NaN ("nan"): the first layer's gradients,
    which backward computes last, after the other buckets are complete."""

    mode = None

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if _Trouble.mode == "raise":
            raise RuntimeError("backward failed")
        return grad * float("nan") if _Trouble.mode == "nan" else grad


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.unused = torch.nn.Linear(64, 64, bias=False)  # a bucket of its own that gets no gradient
        self.first, self.norm = torch.nn.Linear(16, 256), torch.nn.LayerNorm(256)
        self.mid, self.last = torch.nn.Linear(256, 32), torch.nn.Linear(32, 128, bias=False)

    def forward(self, x):
        h = _Trouble.apply(self.first(x))
        return self.last(torch.nn.functional.gelu(self.mid(self.norm(h))))


class _Run:
    """The tier over `_Net` in bf16, under `fake` (the CUDA branches) or on the plain CPU (fake None)."""

    def __init__(self, fake: FakeCuda | None, **options):
        self.fake, self.model = fake, _Net()
        self.x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
        self.losses = []
        with self._mode():
            self.opt = OffloadAdamW(list(self.model.parameters()), device=fake.device if fake else "cpu",
                                    dtype=torch.bfloat16, lr=1e-2, bucket_mb=BUCKET_MB, model=self.model, **options)

    def _mode(self):
        return self.fake if self.fake is not None else nullcontext()

    def backward(self) -> None:
        with self._mode():
            loss = self.model(self.x).float().square().mean()
            self.losses.append(loss.detach())  # no .item(): the host learns nothing of the compute stream here
            loss.backward()

    def step(self) -> None:
        with self._mode():
            self.opt.step()
            self.opt.zero_grad()

    def forward(self) -> None:
        with self._mode():
            self.losses.append(self.model(self.x).float().square().mean().detach())

    def results(self) -> dict:
        with self._mode():
            out = {f"master.{k}": v.clone() for k, v in self.opt.masters_by_name().items()}
            out.update({f"weight.{k}": v.detach().clone() for k, v in self.model.named_parameters()})
            if self.opt.keeps_ema:
                out.update({f"ema.{k}": v.clone() for k, v in self.opt.ema_weights(self.model).items()})
        return out


def _train(run: _Run, steps: int = 3, accumulation: int = 1, between=None) -> None:
    for step in range(steps):
        for _ in range(accumulation):
            run.backward()
        run.opt.ema_decay = 0.5 if run.opt.keeps_ema else None
        run.step()
        if between is not None:
            between(run, step)
    run.forward()


def _same(fast: _Run, sync: _Run) -> None:
    assert fast.fake.violations == []
    assert torch.equal(torch.stack(fast.losses), torch.stack(sync.losses))
    a, b = fast.results(), sync.results()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def fake(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.setattr(overlap, "GATE_BYTES", 1)  # every layer waits for its own buckets
    return fake


def _checkpoint_between(run: _Run, step: int) -> None:
    if step == 0:  # a checkpoint between the step and the next forward settles the queued steps
        with run._mode():
            run.opt.masters_by_name()


def _sample_between(run: _Run, step: int) -> None:
    if step == 1:  # a sample with the average, as `output.sample_every` makes one
        with run._mode(), run.opt.ema_applied(), torch.no_grad():
            run.losses.append(run.model(run.x).float().square().mean())


@pytest.mark.parametrize("options, accumulation, between", [
    ({"overlap_step": False}, 1, None),
    ({"overlap_step": True}, 1, _checkpoint_between),
    ({"step_in_backward": True}, 1, None),
    ({"accumulation_steps": 2, "max_grad_norm": 1e-3, "overlap_step": False}, 2, None),
    ({"ema": True, "overlap_step": True}, 1, _sample_between),
], ids=["step", "overlap", "in-backward", "accumulation-clipping", "ema"])
def test_the_cuda_branches_train_as_the_synchronous_run(fake, options, accumulation, between):
    runs = [_Run(f, **options) for f in (fake, None)]
    for run in runs:
        _train(run, accumulation=accumulation, between=between)
    _same(*runs)


def test_a_step_without_backward_and_checkpoint_loads_wait_for_the_uploads(fake, tmp_path):
    """A step with no backward since the last one zeroes the staging the last uploads read; a load writes the
    staging and the weights."""
    def between(run: _Run, step: int) -> None:
        with run._mode():
            if step == 0:
                run.step()  # no backward: every gradient is zero
            elif step == 1:
                run.opt.load_state_dict(run.opt.state_dict())
            else:
                folder = tmp_path / ("fake" if run.fake else "sync")
                folder.mkdir()
                run.opt.save_state_files(folder)
                run.opt.load_state_dict(run.opt.checkpoint_state())
                run.opt.load_state_files(folder)

    runs = [_Run(f, overlap_step=False) for f in (fake, None)]
    for run in runs:
        _train(run, between=between)
    _same(*runs)


@pytest.mark.parametrize("trouble", ["overflow", "error"])
def test_a_step_in_backward_cut_short_leaves_no_upload_unwaited(fake, trouble):
    """Stepping inside backward, buckets already stepped have uploads in flight when an inf/NaN gradient
    skips the rest (the step is skipped) or when backward raises (the caller zeroes the gradients); the next
    forward must wait for them all the same."""
    def cut(run: _Run, step: int) -> None:
        if step != 0:
            return
        _Trouble.mode = "nan" if trouble == "overflow" else "raise"
        try:
            if trouble == "overflow":
                run.backward()
            else:
                with pytest.raises(RuntimeError, match="backward failed"):
                    run.backward()
        finally:
            _Trouble.mode = None
        if trouble == "overflow":
            run.step()
            assert run.opt.skipped
        else:
            with run._mode():
                run.opt.zero_grad()

    runs = [_Run(f, step_in_backward=True) for f in (fake, None)]
    for run in runs:
        _train(run, between=cut)
    _same(*runs)
