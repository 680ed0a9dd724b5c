"""The race pre-flight's delays (tests/support/delay_streams.py): where each sleep goes, checked on the CPU with
a recording stand-in for `torch.cuda.stream`; and on CUDA a planted race (a read of a side stream's copy
without the wait) that the delay makes visible, while the same read with the wait is right: the canary that
says the pre-flight can find a missing wait on this GPU."""

import pytest
import torch
from support.cli_runs import on
from support.delay_streams import delayed, parse


class _Recorder:
    """A stand-in for torch.cuda.stream(side): records entering and leaving."""

    def __init__(self, calls: list, stream):
        self.calls, self.stream = calls, stream

    def __enter__(self):
        self.calls.append(("enter", self.stream))

    def __exit__(self, *exc):
        self.calls.append(("exit", self.stream))


def _recorded(mode: str, side, cycles: int = 5) -> list:
    calls = []
    with delayed(lambda stream: _Recorder(calls, stream), lambda n: calls.append(("sleep", n)), mode, cycles)(side):
        calls.append(("copy", side))
    return calls


def test_copies_sleep_on_the_side_stream_before_its_copies_and_compute_before_switching():
    assert _recorded("copies", "s") == [("enter", "s"), ("sleep", 5), ("copy", "s"), ("exit", "s")]
    assert _recorded("compute", "s") == [("sleep", 5), ("enter", "s"), ("copy", "s"), ("exit", "s")]
    assert _recorded("copies", None) == [("enter", None), ("copy", None), ("exit", None)]  # a synchronous copy
    assert _recorded("compute", "s", cycles=0) == [("enter", "s"), ("copy", "s"), ("exit", "s")]


def test_install_delays_torch_cuda_stream_as_the_variable_asks(monkeypatch):
    import support.delay_streams as seam

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: calls.append(("sleep", cycles)))
    monkeypatch.setattr(torch.cuda, "stream", lambda side: _Recorder(calls, side))
    assert seam.install({}) is None and seam.install({seam.VARIABLE: ""}) is None
    assert seam.install({seam.VARIABLE: "copies:9"}) == ("copies", 9)
    with torch.cuda.stream("side"):
        calls.append(("copy", "side"))
    assert calls == [("enter", "side"), ("sleep", 9), ("copy", "side"), ("exit", "side")]


def test_the_variable_is_read_or_refused():
    assert parse("") is None and parse("copies:100") == ("copies", 100) and parse("compute:7") == ("compute", 7)
    with pytest.raises(ValueError, match="copies:CYCLES"):
        parse("both:100")


def _read_after_copy(wait: bool) -> bool:
    """A side stream copies ones over zeros (delayed as the pre-flight delays it); the compute stream sums
    the target with or without waiting for it. True when the sum saw the copy."""
    torch.cuda.synchronize()
    side, source = torch.cuda.Stream(), torch.ones(1 << 20, device="cuda")
    target = torch.zeros_like(source)
    torch.cuda.synchronize()
    with delayed(torch.cuda.stream, torch.cuda._sleep, "copies", 200_000_000)(side):  # ~0.1 s
        target.copy_(source, non_blocking=True)
    if wait:
        torch.cuda.current_stream().wait_stream(side)
    total = target.sum()
    torch.cuda.synchronize()
    return total.item() == source.numel()


@pytest.mark.parametrize("device", [on("cuda")])
def test_a_missing_wait_is_seen_under_the_delay(device):
    assert _read_after_copy(wait=True)
    assert not _read_after_copy(wait=False), "the delayed copy landed before an unsynchronised read"
