"""Proves each wait of the offload engine matters: deletes one wait, event record, `record_stream` or
synchronisation at a time (in a copy of the package and its tests), runs the fake-stream tests against it,
and prints which tests fail without it, as a Markdown table.

    PYTHONPATH=$PWD /work/main/.venv/bin/python tests/support/mutate_waits.py   # ~5 minutes on 2 cores
    ... tests/support/mutate_waits.py record_stream    # only the lines that contain "record_stream"

A line is named by its text (the first match in its file, or the `nth`), so the table follows the code as it
moves; a line the script cannot find is an error, not a silent pass. Exit status 1 when a deletion that the
table does not explain (`why`) leaves every test green, or when the unchanged code fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIER = ["tests/unit/test_stream_waits.py"]
STREAMER = ["tests/e2e/test_param_streaming.py::test_the_cuda_branches_wait_on_the_right_events"]


@dataclass
class Wait:
    path: str
    text: str      # the line, stripped
    orders: str    # what it orders
    tests: list
    nth: int = 0
    why: str = ""  # a deletion no test can catch: why it is not needed


WAITS = [
    Wait("sdtune/offload/optimizer.py", "self._grads_stream.wait_stream(torch.cuda.current_stream(self.device))",
         "a gradient's copy to the host after the compute stream wrote it", TIER),
    Wait("sdtune/offload/optimizer.py", "flat.record_stream(self._grads_stream)  # the tensor the copy reads stays "
         "allocated until it is done", "the freed gradient's reuse after its copy to the host read it", TIER),
    Wait("sdtune/offload/optimizer.py", "stream.wait_stream(torch.cuda.current_stream(self.device))",
         "the gathered small gradients' and the norm's copies after the compute stream wrote them", TIER),
    Wait("sdtune/offload/optimizer.py", "squared.record_stream(stream)",
         "the freed norm's reuse after its copy to the host read it", TIER),
    Wait("sdtune/offload/optimizer.py", "bucket.event.record(stream)",
         "the bucket's event after all its gradient copies", TIER),
    Wait("sdtune/offload/optimizer.py", "bucket.event.synchronize()",
         "the worker reads the staged gradients after their copies", TIER),
    Wait("sdtune/offload/optimizer.py", "self._drain_streams()",
         "`_reset` after a backward that raised: its stepped buckets' uploads before the next forward", TIER),
    Wait("sdtune/offload/optimizer.py", "stream.synchronize()",
         "`_drain_streams`: the host waits for both side streams (every drain at once)", TIER),
    Wait("sdtune/offload/optimizer.py", "self._drain_streams()  # the last uploads may still read the staging",
         "a step without backward zeroes the staging after the last uploads read it", TIER),
    Wait("sdtune/offload/optimizer.py", "self._uploaded()",
         "the next forward reads the weights after the step's uploads", TIER),
    Wait("sdtune/offload/optimizer.py", "self._uploaded()",
         "after a step in backward skipped by an overflow: the next forward after the uploads already made",
         TIER, nth=1),
    Wait("sdtune/offload/optimizer.py", "self._drain_streams()  # an earlier upload may still read the staging",
         "a checkpoint load writes the staging after the last uploads read it", TIER),
    Wait("sdtune/offload/optimizer.py", "stream.wait_event(bucket.event)",
         "a bucket's upload after backward's last read of its weights", TIER,
         why="every upload is issued by a host thread that has already synchronised `bucket.event` (`_arrived`, "
             "which every step waits for) or drained both streams (`_publish`), so the upload is already ordered "
             "after it: the wait is redundant, kept as cheap insurance for an upload issued otherwise"),
    Wait("sdtune/offload/optimizer.py", "torch.cuda.current_stream(self.device).wait_stream(self._upload_stream)",
         "`_uploaded`: the compute stream waits for the queued uploads (every caller at once)", TIER),
    Wait("sdtune/offload/optimizer.py", "self._uploaded()", "`load_state_files`: the forward after the load's uploads",
         TIER, nth=2),
    Wait("sdtune/offload/optimizer.py", "self._uploaded()", "`load_state_dict`: the forward after the load's uploads",
         TIER, nth=3),
    Wait("sdtune/offload/optimizer.py", "self._drain_streams()",
         "`ema_applied`: the average goes into the weights after the uploads", TIER, nth=1,
         why="every path that queues an upload makes the compute stream wait for it before `ema_applied` can run "
             "(`_uploaded` at the end of every step, skipped or not, and `settle`), and `ema_applied` reads and "
             "writes the weights on the compute stream: the drain is redundant, kept as insurance"),
    Wait("sdtune/offload/overlap.py", "torch.cuda.current_stream(self.device).wait_event(bucket.uploaded)",
         "overlap_step: a block's forward after its buckets' uploads", TIER),
    Wait("sdtune/offload/overlap.py", "self.uploaded()",
         "overlap_step `settle`: what runs after a checkpoint (whose gates are open) waits for every upload", TIER),
    Wait("sdtune/offload/overlap.py", "bucket.uploaded.record(self.upload_stream)",
         "overlap_step: the bucket's event after its upload", TIER),
    Wait("sdtune/offload/params.py", "torch.cuda.current_stream(self.device).wait_event(unit.buffer.filled)",
         "weight streaming: a block's use after its copy to the device", STREAMER),
    Wait("sdtune/offload/params.py", "unit.buffer.released.record(torch.cuda.current_stream(self.device))",
         "weight streaming: a buffer's refill after its last reader", STREAMER),
    Wait("sdtune/offload/params.py", "events[1].record(torch.cuda.current_stream(self.device))",
         "weight streaming: a new buffer's first fill after the compute stream's allocation", STREAMER),
    Wait("sdtune/offload/params.py", "self._stream.wait_event(buffer.released)  # not the whole compute stream: "
         "only its last reader", "weight streaming: the copy stream waits for the buffer's release", STREAMER),
    Wait("sdtune/offload/params.py", "buffer.filled.record(self._stream)",
         "weight streaming: the buffer's event after its copy", STREAMER),
    Wait("sdtune/offload/params.py", "flat.record_stream(self._stream)",
         "weight streaming: the pool freed with the streamer while a prefetch still writes it", STREAMER,
         why="needed only when the streamer is freed with a prefetch still in flight (the pool lives as long as "
             "the streamer); no CPU test frees one so: not proven here (outside issue 30's optimizer tier)"),
]


def _line(source: list[str], wait: Wait) -> int:
    found = [i for i, line in enumerate(source) if line.strip() == wait.text]
    if len(found) <= wait.nth:
        raise SystemExit(f"{wait.path}: no line {wait.nth + 1} reads {wait.text!r}: update WAITS")
    return found[wait.nth]


def _failures(copy: Path, tests: list) -> list[str] | None:
    """The tests that fail against the package in `copy` (None: the run itself broke)."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                          "-rf", *tests], cwd=copy, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", run.stdout, flags=re.M)
    if run.returncode not in (0, 1) or (run.returncode == 1 and not failed):
        return None
    return [name.split("::", 1)[1] for name in failed]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sdtune-mutate-"))
    try:
        for part in ("sdtune", "tests"):  # run in the copy: the working directory comes first on sys.path
            shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", work)
        if _failures(work, TIER + STREAMER) != []:
            print("the unchanged code fails the fake-stream tests: fix that first", file=sys.stderr)
            return 1
        print("| wait (file:line) | what it orders | tests that fail without it |\n|---|---|---|")
        unexplained = 0
        for wait in [w for w in WAITS if all(word in w.text for word in sys.argv[1:])]:
            original = (ROOT / wait.path).read_text()
            source = original.splitlines(keepends=True)
            i = _line(source, wait)
            indent = source[i][:len(source[i]) - len(source[i].lstrip())]
            source[i] = f"{indent}pass  # mutated\n"
            (work / wait.path).write_text("".join(source))
            try:
                failed = _failures(work, wait.tests)
            finally:
                (work / wait.path).write_text(original)
            if failed:  # the first, and how many more
                caught = f"`{failed[0]}`" + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else "")
            elif failed is None:
                caught = "the test run broke (see it by hand)"
            else:
                caught = f"none: {wait.why}" if wait.why else "**NONE**"
                unexplained += not wait.why
            print(f"| `{wait.text.split('  #')[0]}` ({wait.path}:{i + 1}) | {wait.orders} | {caught} |", flush=True)
        return 1 if unexplained else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
