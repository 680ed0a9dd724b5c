"""The host optimizer tier gives back what it holds in `close()`: its worker thread ends, and its host buffers
(staging, moments, gradient sums, the moving average) are freed, while the weights taken from it stay valid."""

import gc
import weakref

import torch

from sdtune.offload import NvmeAdamW, OffloadAdamW


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))


def _stepped(optimizer, model) -> None:
    for _ in range(2):  # accumulation_steps=2: one optimizer step
        model(torch.randn(4, 64)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _threads(*pools) -> list:
    """The threads of these executors (the tier's own) that are still running."""
    return [t for pool in pools if pool is not None for t in pool._threads if t.is_alive()]


def test_close_ends_the_worker_and_frees_the_host_buffers():
    model = _model()
    optimizer = OffloadAdamW(model.parameters(), device="cpu", dtype=torch.float32, lr=1e-2, model=model,
                             overlap_step=True, accumulation_steps=2, ema=True)
    _stepped(optimizer, model)
    model(torch.randn(1, 64))  # the queued step runs on the worker: wait for it, as the next forward does
    worker = optimizer._worker
    assert _threads(worker)
    masters = optimizer.masters_by_name()  # what an export takes: views that must outlive the tier
    expected = {name: value.clone() for name, value in masters.items()}
    bucket = optimizer._buckets[0]
    state = optimizer.state[bucket.master]
    freed = {"staging": weakref.ref(optimizer._staging), "exp_avg": weakref.ref(state["exp_avg"]),
             "exp_avg_sq": weakref.ref(state["exp_avg_sq"]),
             "gradient sum": weakref.ref(bucket.grad), "average": weakref.ref(bucket.ema),
             "bucket": weakref.ref(bucket)}
    del bucket, state
    optimizer.close()
    optimizer.close()  # a second call is harmless
    gc.collect()
    assert [name for name, ref in freed.items() if ref() is not None] == ["bucket"]  # the forward's gates name it
    assert not _threads(worker)
    assert optimizer.host_pinning == "pageable"  # what the summary reports stays as it was
    for name, value in masters.items():
        assert torch.equal(value, expected[name])
    model(torch.randn(1, 64)).sum().backward()  # no hook of the tier is left on the parameters
    assert all(p.grad is not None for p in model.parameters())


def test_the_nvme_tier_closes_its_threads_and_file(tmp_path):
    model = _model()
    optimizer = NvmeAdamW(model.parameters(), device="cpu", dtype=torch.float32, lr=1e-2, offload_dir=str(tmp_path),
                          accumulation_steps=2)
    _stepped(optimizer, model)
    ring, pools = weakref.ref(optimizer._ring[0]), (optimizer._reader, optimizer._writer)
    assert list(tmp_path.iterdir()) and _threads(*pools)
    optimizer.close()
    gc.collect()
    assert ring() is None and not _threads(*pools) and not list(tmp_path.iterdir())
