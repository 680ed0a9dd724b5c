"""The race pre-flight's delays (tests/support/delay_streams.py): where each sleep goes, checked on the CPU with
a recording stand-in for `torch.cuda.stream`; and on CUDA a planted race (a read of a side stream's copy
without the wait) that the delay makes visible, while the same read with the wait is right: the canary that
says the pre-flight can find a missing wait on this GPU."""

import pytest
import torch
from support.cli_runs import on
from support.delay_streams import delayed, parse


def _recorded(mode: str, side, cycles: int = 5) -> list:
    calls = []

    class Context:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            calls.append(("enter", self.stream))

        def __exit__(self, *exc):
            calls.append(("exit", self.stream))

    with delayed(Context, lambda n: calls.append(("sleep", n)), mode, cycles)(side):
        calls.append(("copy", side))
    return calls


def test_copies_sleep_on_the_side_stream_before_its_copies_and_compute_before_switching():
    assert _recorded("copies", "s") == [("enter", "s"), ("sleep", 5), ("copy", "s"), ("exit", "s")]
    assert _recorded("compute", "s") == [("sleep", 5), ("enter", "s"), ("copy", "s"), ("exit", "s")]
    assert _recorded("copies", None) == [("enter", None), ("copy", None), ("exit", None)]  # a synchronous copy
    assert _recorded("compute", "s", cycles=0) == [("enter", "s"), ("copy", "s"), ("exit", "s")]


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
