"""`memory.resolve_attention`: "auto" takes xformers only where one tiny attention call runs.

The real probe needs a CUDA GPU; here a fake `xformers` stands in, torch claims a GPU, and the probe's
tensors live on the CPU, so every branch of the decision runs on any machine. The `gpu` test at the end
runs the real probe where a GPU is visible.
"""

import importlib.machinery
import logging
import sys
import types

import pytest
import torch
from support.helpers import said

import sdtune.plan as memory
from sdtune.config import MemoryConfig
from sdtune.errors import SdtuneError

BROKEN = "No operator found for `memory_efficient_attention_forward` with inputs:\n     query : shape=(1, 8, 1, 40)"


@pytest.fixture(autouse=True)
def fresh_probe():
    memory._xformers_fails.cache_clear()
    yield
    memory._xformers_fails.cache_clear()


@pytest.fixture
def gpu(monkeypatch):
    """torch sees a GPU; the probe's tensors go to the CPU, where the fake kernels run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory, "_PROBE_DEVICE", "cpu")


def fake_xformers(monkeypatch, attention):
    """Put a module named xformers with `ops.memory_efficient_attention = attention` where import finds it."""
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    package.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
    package.ops, ops.memory_efficient_attention = ops, attention
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def no_xformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import raises ModuleNotFoundError
    monkeypatch.setattr(memory, "_xformers_installed", lambda: False)


def broken(q, k, v):  # what a wheel built for another torch or CUDA raises
    raise NotImplementedError(BROKEN)


def working(q, k, v):
    assert q.dtype == torch.float16 and q.shape == (1, 8, 1, 40)
    return q * 1


def test_auto_falls_back_to_sdpa_with_one_line_naming_the_error(monkeypatch, gpu, caplog):
    fake_xformers(monkeypatch, broken)
    caplog.set_level(logging.INFO, logger="sdtune")
    assert memory.resolve_attention("auto", "cuda", report=True) == "sdpa"
    lines = said(caplog)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "No operator found for `memory_efficient_attention_forward`" in lines[0]
    assert "query" not in lines[0]  # only the error's first line
    assert "reinstall xformers" in lines[0] and "memory.attention=sdpa" in lines[0]


def test_auto_takes_xformers_when_it_runs(monkeypatch, gpu, caplog):
    fake_xformers(monkeypatch, working)
    caplog.set_level(logging.INFO, logger="sdtune")
    assert memory.resolve_attention("auto", "cuda", report=True) == "xformers"
    lines = said(caplog)
    assert lines == []


def test_auto_without_xformers_is_sdpa_and_says_nothing(monkeypatch, gpu, caplog):
    no_xformers(monkeypatch)
    caplog.set_level(logging.INFO, logger="sdtune")
    assert memory.resolve_attention("auto", "cuda", report=True) == "sdpa"
    lines = said(caplog)
    assert lines == []


def test_explicit_xformers_that_fails_is_one_line(monkeypatch, gpu):
    fake_xformers(monkeypatch, broken)
    with pytest.raises(SdtuneError) as caught:
        memory.resolve_attention("xformers", "cuda")
    message = str(caught.value)
    assert "\n" not in message and "No operator found" in message
    assert "reinstall xformers" in message and "memory.attention=sdpa" in message


def test_explicit_xformers_that_runs_is_taken(monkeypatch, gpu):
    fake_xformers(monkeypatch, working)
    assert memory.resolve_attention("xformers", "cuda") == "xformers"


def test_explicit_xformers_not_installed_names_the_install_command(monkeypatch, gpu):
    no_xformers(monkeypatch)
    with pytest.raises(SdtuneError, match=r"not installed; pip install 'sdtune\[xformers\]'"):
        memory.resolve_attention("xformers", "cuda")


def test_a_failed_import_counts_as_broken_not_missing(monkeypatch, gpu):
    """An installed wheel whose extension does not load: the import error, not the install command."""
    def fail(name, *args, **kwargs):
        if name.startswith("xformers"):
            raise ImportError("libcudart.so.11.0: cannot open shared object file\nmore detail")
        return real_import(name, *args, **kwargs)

    real_import = __import__
    monkeypatch.setattr(memory, "_xformers_installed", lambda: True)
    monkeypatch.delitem(sys.modules, "xformers", raising=False)
    monkeypatch.delitem(sys.modules, "xformers.ops", raising=False)
    monkeypatch.setattr("builtins.__import__", fail)
    with pytest.raises(SdtuneError, match=r"fails on this GPU \(ImportError: libcudart.so.11.0: cannot open shared "
                                          r"object file\); reinstall"):
        memory.resolve_attention("xformers", "cuda")


def test_the_probe_runs_once_per_process(monkeypatch, gpu, caplog):
    calls = []
    fake_xformers(monkeypatch, lambda q, k, v: calls.append(1) or broken(q, k, v))
    caplog.set_level(logging.INFO, logger="sdtune")
    for _ in range(3):
        assert memory.resolve_attention("auto", "cuda", report=True) == "sdpa"
    lines = said(caplog)
    assert len(calls) == 1 and len(lines) == 3


def test_on_the_cpu_auto_is_sdpa_and_never_probes(monkeypatch):
    fake_xformers(monkeypatch, lambda q, k, v: pytest.fail("probed on the CPU"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("cpu", "meta"):
        assert memory.resolve_attention("auto", device) == "sdpa"
        with pytest.raises(SdtuneError, match="needs a CUDA GPU"):
            memory.resolve_attention("xformers", device)
    assert memory.resolve_plan(MemoryConfig(device="cpu", attention="auto")).attention == "sdpa"


def test_planning_for_a_gpu_this_machine_lacks(monkeypatch):
    """The estimator plans device "cuda" without one: no probe can run, so auto is SDPA and an explicit
    xformers is taken at its word (the GPU machine checks it when training starts)."""
    fake_xformers(monkeypatch, lambda q, k, v: pytest.fail("probed without a GPU"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.resolve_attention("auto", "cuda") == "sdpa"
    assert memory.resolve_attention("xformers", "cuda") == "xformers"
    assert memory.resolve_attention("sdpa", "cuda") == "sdpa"


def test_resolve_plan_passes_its_log_on(monkeypatch, gpu, caplog):
    fake_xformers(monkeypatch, broken)
    monkeypatch.setattr(memory, "_native_bf16", lambda: True)
    caplog.set_level(logging.INFO, logger="sdtune")
    plan = memory.resolve_plan(MemoryConfig(device="cuda", attention="auto"), report=True)
    assert plan.attention == "sdpa" and len(said(caplog)) == 1
    caplog.clear()
    assert memory.resolve_plan(MemoryConfig(device="cuda", attention="auto")).attention == "sdpa"  # not asked: silent
    assert said(caplog) == []


@pytest.mark.gpu
def test_the_real_probe_agrees_with_a_real_call(caplog):
    """On a GPU with xformers: the probe decides, says why when it declines, and a call at SD's own sizes
    (64 tokens, 8 heads of 40) then runs forward and backward."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        pytest.skip("xformers is not installed")
    caplog.set_level(logging.INFO, logger="sdtune")
    choice = memory.resolve_attention("auto", "cuda", report=True)
    lines = said(caplog)
    assert choice in ("sdpa", "xformers") and len(lines) == (choice == "sdpa")
    if choice == "xformers":
        import xformers.ops

        q = torch.randn(2, 64, 8, 40, device="cuda", dtype=torch.float16, requires_grad=True)
        xformers.ops.memory_efficient_attention(q, q, q).sum().backward()
        assert torch.isfinite(q.grad).all()
