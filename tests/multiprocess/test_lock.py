"""The output-folder lock, with real processes: a live holder refuses, a SIGKILLed one is taken over, and of
several runs started together exactly one wins."""

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.helpers import said

from sdtune.errors import SdtuneError
from sdtune.train.lock import LOCK_NAME, output_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from sdtune.errors import SdtuneError
from sdtune.train.lock import output_lock
try:
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
except SdtuneError:
    print("refused", flush=True)
"""


def _holder(out: Path, seconds: float = 60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(seconds)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def test_a_live_holder_refuses_and_a_killed_one_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SdtuneError) as refused:
            with output_lock(out):
                pass
        message = str(refused.value)
        assert f"pid {holder.pid} on " in message and "since " in message
        assert "in use by another sdtune run" in message and "--out" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (out / LOCK_NAME).is_file()  # SIGKILL leaves the file behind, but not the flock

    caplog.set_level(logging.INFO, logger="sdtune")
    with output_lock(out) as path:
        assert path == out / LOCK_NAME
        assert f'"pid": {os.getpid()}' in path.read_text()
    lines = said(caplog)
    assert len(lines) == 1 and "taking over" in lines[0] and f"pid {holder.pid}" in lines[0]
    assert not (out / LOCK_NAME).exists()


def test_the_same_process_cannot_take_it_twice_and_release_removes_the_file(tmp_path, caplog):
    out = tmp_path / "new" / "out"  # created, parents too
    caplog.set_level(logging.INFO, logger="sdtune")
    with output_lock(out):
        with pytest.raises(SdtuneError, match=f"pid {os.getpid()} "):
            with output_lock(out):
                pass
        assert (out / LOCK_NAME).is_file()  # the refused attempt left the holder's file alone
    assert said(caplog) == [] and list(out.iterdir()) == []
    with pytest.raises(RuntimeError):  # an exception in the run releases it too
        with output_lock(out):
            raise RuntimeError("the run failed")
    with output_lock(out):
        pass
    assert said(caplog) == [] and list(out.iterdir()) == []


def test_of_runs_started_together_exactly_one_wins(tmp_path):
    out = tmp_path / "out"
    runs = [_holder(out, seconds=3) for _ in range(6)]
    answers = []
    for run in runs:
        answers.append(run.stdout.readline().strip())
        run.wait()
        run.stdout.close()
    assert sorted(answers) == ["locked"] + ["refused"] * 5
    assert not (out / LOCK_NAME).exists()


def _no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")


@pytest.mark.parametrize("fcntl", [None, SimpleNamespace(flock=_no_flock, LOCK_EX=2, LOCK_NB=4)],
                         ids=["no-fcntl", "filesystem-without-flock"])
def test_without_flock_the_file_itself_is_the_lock(tmp_path, monkeypatch, fcntl, caplog):
    import sdtune.train.lock

    monkeypatch.setattr(sdtune.train.lock, "fcntl", fcntl)  # None: as on Windows
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(SdtuneError, match=f"pid {os.getpid()} .*delete .*{LOCK_NAME} if that run is gone"):
            with output_lock(out):
                pass
    assert not (out / LOCK_NAME).exists()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = gone.stdout.strip()
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "started": 0}))
    caplog.set_level(logging.INFO, logger="sdtune")
    with output_lock(out):
        pass
    lines = said(caplog)
    assert len(lines) == 1 and f"pid {dead} on " in lines[0] and "taking over" in lines[0]
