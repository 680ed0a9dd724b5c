"""The disk: a full disk during a checkpoint, a cache or the export is one line and resumes once space is
freed; free space is checked before each checkpoint and export; a finished run keeps no resume state unless
asked; a read-only --out is one line.

A real small disk is a tmpfs the test mounts (root only; skipped elsewhere); the free-space checks and a
read-only folder are also tested anywhere, by what the OS would report.
"""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.errors import SdtuneError
from sdtune.train import store as checkpoint
from sdtune.train.lock import output_lock
from sdtune.util import files
from sdtune.util.world import World

runner = CliRunner()
RUN = ("--max-steps", "4", "--set", "output.checkpoint_every=2", "--set", "output.keep_checkpoints=3")


def _train(model, images, out, *extra):
    return runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(model),
                               "--out", str(out), *RUN, *extra])


def _one_error_line(result, *words) -> str:
    import traceback
    assert result.exit_code == 2, result.output + "".join(traceback.format_exception(*result.exc_info))
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _mount_tmpfs(folder: Path, *options: str) -> None:
    folder.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=64m", *options]), "tmpfs", str(folder)],
                          capture_output=True)
    if done.returncode:
        pytest.skip("mounting a small tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB filesystem of its own, which the test can fill."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int, name: str = "filler") -> Path:
    """A file that leaves `leave` bytes free on `disk`."""
    filler = disk / name
    size = shutil.disk_usage(disk).free - leave
    with open(filler, "wb") as f:
        for _ in range(size // 2**20):
            f.write(bytes(2**20))
        f.write(bytes(size % 2**20))
    return filler


def _fill_after_first_checkpoint(monkeypatch, disk: Path, leave) -> None:
    """The disk fills up (another program, the samples) once the run's first checkpoint is written;
    `leave(checkpoint)` is how many bytes remain free."""
    real = checkpoint.save_checkpoint

    def save_then_fill(out_dir, step, **kwargs):
        saved = real(out_dir, step, **kwargs)
        if not (disk / "filler").exists():
            _fill(disk, leave(saved))
        return saved

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_fill)


@pytest.mark.parametrize("fails_in", ["weights", "state"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_resumes_once_space_is_freed(
        tiny_sd1, images, small_disk, monkeypatch, fails_in):
    """The disk fills between the free-space check and the write (the check is passed over here): the
    safetensors write (`weights`) or torch.save of the optimizer state (`state`) fails on the real disk.
    One line; no half-written step-N.tmp holds the disk; --resume works once space is freed."""
    out = small_disk / "out"
    _fill_after_first_checkpoint(monkeypatch, small_disk, lambda saved: (
        256 * 2**10 if fails_in == "weights" else (saved / "unet.safetensors").stat().st_size + 256 * 2**10))
    monkeypatch.setattr(checkpoint, "check_space_all_ranks", lambda *args: None)
    line = _one_error_line(_train(tiny_sd1, images, out), "disk full: checkpoint step-000004 in",
                           "checkpoints needs", "is free", "step-000002 is intact", "--resume")
    assert float(line.split(" needs ")[1].split()[0]) > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no step-000004.tmp
    assert checkpoint.verify(out / "checkpoints" / "step-000002") is None
    monkeypatch.undo()
    (small_disk / "filler").unlink()  # the user frees space
    resumed = _train(tiny_sd1, images, out, "--resume", "--set", "output.keep_final_state=true")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "at step 2" in resumed.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_checkpoint_is_refused_before_writing_when_the_disk_is_too_full(tiny_sd1, images, small_disk,
                                                                           monkeypatch):
    """The free-space check: with too little room for the next checkpoint, one line before anything is
    written. On a disk full to the last byte the lock is taken all the same (its record skipped) and the
    first write that fails is one line."""
    out = small_disk / "out"
    _fill_after_first_checkpoint(monkeypatch, small_disk, lambda saved: 2**20)
    _one_error_line(_train(tiny_sd1, images, out), "not enough disk space for checkpoint step-000004 in",
                    "it needs", "and 1.0 MiB is free", "step-000002 is intact")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    monkeypatch.undo()
    _fill(small_disk, 0, name="more")  # now quite full: the lock still holds, the first write says so
    assert shutil.disk_usage(small_disk).free == 0
    _one_error_line(_train(tiny_sd1, images, out, "--resume"), f"disk full: {out} has 0 KiB free; free space there "
                    "and continue with --resume")
    (small_disk / "more").unlink()
    _one_error_line(_train(tiny_sd1, images, out, "--resume"), "not enough disk space for checkpoint step-000004")


def test_the_lock_is_taken_on_a_full_disk(tmp_path, monkeypatch):
    """The lock's record (who holds it) cannot be written on a full disk: the lock holds all the same."""
    real = os.pwrite

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    with output_lock(tmp_path / "out") as path:
        assert path.is_file()
        with pytest.raises(SdtuneError, match="in use by another sdtune run"):
            with output_lock(tmp_path / "out"):
                pass
    monkeypatch.setattr(os, "pwrite", real)


def test_the_libraries_errors_of_a_full_disk_are_recognised(small_disk):
    """safetensors' SafetensorError names "os error 28"; torch.save into an open file keeps the OSError as
    its RuntimeError's context (into a path it would not: "unexpected pos")."""
    from safetensors.torch import save_file

    _fill(small_disk, 0)
    tensors = {"a": torch.zeros(1 << 16)}
    with pytest.raises(Exception) as caught:
        save_file(tensors, small_disk / "a.safetensors")
    assert files.os_errno(caught.value) == errno.ENOSPC
    with pytest.raises(Exception) as caught:  # RuntimeError, or the file's close raising OSError over it
        with open(small_disk / "b.pt", "wb") as f:
            torch.save(tensors, f)
    assert files.os_errno(caught.value) == errno.ENOSPC
    with pytest.raises(RuntimeError) as caught:
        torch.save(tensors, small_disk / "c.pt")
    assert files.os_errno(caught.value) is None


def test_a_full_disk_in_the_latent_cache_is_one_line(tiny_sd1, images, small_disk, tmp_path):
    cache = small_disk / "cache"
    _fill(small_disk, 16 * 2**10)
    result = _train(tiny_sd1, images, tmp_path / "out", "--set", "data.cache_latents=true",
                    "--set", f"data.cache_dir={cache}")
    _one_error_line(result, "disk full: the latents cache in", str(cache), "is free",
                    "data.cache_dir to another disk", "data.cache_latents=false")
    assert not list(cache.rglob("*.tmp"))


def test_checkpoints_and_the_export_check_free_space_first(tiny_sd1, images, tmp_path, monkeypatch):
    """5(b) anywhere (no mount): the disk reports little free; nothing is written before the line."""
    monkeypatch.setattr(files, "free_bytes", lambda folder: 300 * 2**10, raising=False)
    out = tmp_path / "out"
    _one_error_line(_train(tiny_sd1, images, out), "not enough disk space for checkpoint step-000002 in",
                    "300 KiB is free", "no earlier checkpoint exists")
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    out = tmp_path / "lean"
    line = _one_error_line(_train(tiny_sd1, images, out, "--set", "output.keep_checkpoints=0"),
                           "not enough disk space for the trained model in", "300 KiB is free",
                           "output.keep_checkpoints=0")
    assert "needs" in line and not (out / "unet").exists()


def test_keep_checkpoints_0_on_a_disk_too_small_for_the_model_is_refused_before_step_1(tiny_sd1, images, tmp_path,
                                                                                     monkeypatch):
    """With no checkpoint, a model the disk cannot take at the end would lose every step: the export's
    need is checked before step 1, and it is what the export itself then checks (the trained UNet counted
    in output.save_precision before it is cast to it)."""
    real, checked = files.check_space, []

    def recording(folder, needed, what, fix):
        checked.append((what, needed))
        return real(folder, needed, what, fix)

    monkeypatch.setattr(files, "check_space", recording)
    result = _train(tiny_sd1, images, tmp_path / "fits", "--set", "output.keep_checkpoints=0")
    assert result.exit_code == 0, result.output
    assert [what for what, _ in checked] == ["the trained model"] * 2
    assert checked[0][1] == checked[1][1]  # before step 1 and at the export: the same bytes

    monkeypatch.setattr(files, "free_bytes", lambda folder: 300 * 2**10)
    out = tmp_path / "small"
    line = _one_error_line(_train(tiny_sd1, images, out, "--set", "output.keep_checkpoints=0"),
                           "not enough disk space for the trained model in", "300 KiB is free",
                           f"it needs {files.size_text(checked[0][1])}", "output.keep_checkpoints=0 keeps no")
    assert "step" not in line and not (out / "metrics.jsonl").exists()  # refused before the first step


@dataclasses.dataclass(frozen=True)
class _ThreadWorld(World):
    """One rank of a job whose ranks are threads: `any` is the MAX over the ranks that torch.distributed's
    all-reduce makes of it, each rank waiting for the others' flags; a rank that skips it leaves the others
    waiting (here 10 s, under torchrun forever)."""

    flags: list = dataclasses.field(default_factory=list)
    meeting: threading.Barrier | None = None

    def any(self, flag: bool) -> bool:
        self.flags[self.rank] = flag
        self.meeting.wait()
        result = any(self.flags)
        self.meeting.wait()  # every rank has read the flags before a later call writes them
        return result


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_save_refused_for_disk_space_stops_every_rank(tmp_path, monkeypatch, method):
    """Two ranks save at step 2 on a disk with 1 KiB free: rank 0 measures and refuses, and rank 1 raises
    the refusal too, before it goes into a collective (FSDP's gather of the weights, or the next step's
    all-reduce) where it would wait for rank 0 forever."""
    from sdtune.export import saves
    from sdtune.train.method import FullFineTune, Lora

    monkeypatch.setattr(files, "free_bytes", lambda folder: 2**10)
    gathered = []  # ranks that went into the weights' gather (a collective under FSDP)

    def run_of(world):
        part = SimpleNamespace(state_dict=lambda: {"w": torch.zeros(2**16)})
        placement = SimpleNamespace(lora={"unet": part} if method == "lora" else None, sharded=True,
                                    method=Lora() if method == "lora" else FullFineTune(),
                                    trained_params=lambda: [torch.zeros(2**16)],
                                    weights=lambda: gathered.append(world.rank) or {})
        return SimpleNamespace(out_dir=tmp_path, step=2, world=world, placement=placement, ema=None,
                               components=SimpleNamespace(unet=part, vae=part, text_encoders=[part]),
                               cfg=SimpleNamespace(output=SimpleNamespace(save_precision="fp16")))

    flags, meeting, raised = [False, False], threading.Barrier(2, timeout=10), {}

    def rank(r):
        try:
            saves.write(run_of(_ThreadWorld(rank=r, size=2, flags=flags, meeting=meeting)))
        except Exception as exc:  # noqa: BLE001  (what each rank raised is the test's result)
            raised[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(raised.get(r), SdtuneError) for r in (0, 1)), raised
    assert str(raised[0]).startswith("not enough disk space for the save step-000002.safetensors in ")
    assert str(raised[1]) == f"rank 0 refused the save step-000002.safetensors: not enough disk space in {tmp_path}"
    assert gathered == [] and not (tmp_path / "saves").exists()


def test_a_finished_run_keeps_no_resume_state_unless_asked(tiny_sd1, images, tmp_path):
    lean = _train(tiny_sd1, images, tmp_path / "lean")
    assert lean.exit_code == 0, lean.output
    assert not (tmp_path / "lean" / "checkpoints").exists()
    last = lean.output.strip().splitlines()[-1]
    assert last.startswith(f"{tmp_path / 'lean'}/ holds ") and "resume checkpoints (" in last, last
    assert "were deleted (output.keep_final_state=true keeps them)" in last
    disk = json.loads((tmp_path / "lean" / "summary.json").read_text())["disk"]
    assert disk["checkpoint_bytes"] > 0 and not disk["checkpoints_kept"]
    assert disk["output_bytes"] == pytest.approx(files.folder_bytes(tmp_path / "lean"), rel=0.01)

    kept = _train(tiny_sd1, images, tmp_path / "kept", "--set", "output.keep_final_state=true")
    assert kept.exit_code == 0, kept.output
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "kept")] == ["step-000002", "step-000004"]
    assert "are resume checkpoints (kept: output.keep_final_state=true" in kept.output.strip().splitlines()[-1]


def test_keep_checkpoints_0_writes_no_resume_state_and_says_so_once(tiny_sd1, images, tmp_path):
    result = _train(tiny_sd1, images, tmp_path / "out", "--set", "output.keep_checkpoints=0",
                    "--set", "output.checkpoint_every=1", "--set", "output.keep_final_state=true")
    assert result.exit_code == 0, result.output
    assert result.output.count("output.keep_checkpoints=0: no resume checkpoints are written") == 1
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert result.output.strip().splitlines()[-1].endswith("no resume checkpoints were kept")


def _dtypes(file: Path) -> set:
    """The dtypes of a file's floating-point tensors (the text encoder's position ids are integers)."""
    with safe_open(str(file), framework="pt") as f:
        return {f.get_slice(key).get_dtype() for key in f.keys()} - {"I64"}


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", "F16"), ("bf16", "BF16"), ("fp32", "F32")])
def test_save_precision_is_the_written_models(tiny_sd1, images, tmp_path, precision, dtype):
    out = tmp_path / precision
    args = ("--set", f"output.save_precision={precision}") if precision != "fp16" else ()  # fp16: the default
    result = _train(tiny_sd1, images, out, *args)
    assert result.exit_code == 0, result.output
    assert _dtypes(out / "unet" / "diffusion_pytorch_model.safetensors") == {dtype}
    from diffusers import StableDiffusionPipeline

    assert StableDiffusionPipeline.from_pretrained(out).unet is not None


def test_save_precision_of_the_single_file(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtune.export import export_single_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    parts = SimpleNamespace(unet=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder],
                            prediction_type="epsilon", zero_terminal_snr=False)
    for precision, dtype in (("fp16", "F16"), ("bf16", "BF16"), ("fp32", "F32")):
        written = export_single_file(parts, tmp_path, force=True, name=f"{precision}.safetensors",
                                     precision=precision)
        assert _dtypes(written.path) == {dtype}


@pytest.fixture(params=["mount", "patched"])
def read_only_out(request, tmp_path, monkeypatch):
    """A read-only --out: a tmpfs mounted read-only (root), else os.open refusing as such a disk does."""
    out = tmp_path / "ro"
    if request.param == "mount":
        _mount_tmpfs(out, "ro")
        yield out
        subprocess.run(["umount", "-l", str(out)], check=False)
        return
    out.mkdir()
    real = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    yield out


def test_a_read_only_out_is_one_line(tiny_sd1, images, read_only_out):
    _one_error_line(_train(tiny_sd1, images, read_only_out),
                    f"cannot write to {read_only_out} (read-only file system): choose another --out")


def test_the_disk_holds_keep_checkpoints_at_most_while_one_is_written(tiny_sd1, images, tmp_path, monkeypatch):
    """The oldest checkpoint beyond keep - 1 goes before the next is written, not after: keep, not keep + 1."""
    real, present = checkpoint._write_files, []

    def count_then_write(folder, *args, **kwargs):
        present.append(len(checkpoint.list_checkpoints(folder.parent.parent)))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "_write_files", count_then_write)
    result = _train(tiny_sd1, images, tmp_path / "out", "--set", "output.checkpoint_every=1",
                    "--set", "output.keep_checkpoints=2", "--set", "output.keep_final_state=true")
    assert result.exit_code == 0, result.output
    assert present == [0, 1, 1, 1]  # and the one being written: 2
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "out")] == ["step-000003", "step-000004"]


def test_a_finished_lean_run_is_not_replaced_unasked(tiny_sd1, images, tmp_path):
    """Its checkpoints deleted, a finished run's folder is its model: a fresh run or --resume (which would
    start over) is refused; --overwrite trains it again."""
    out = tmp_path / "out"
    assert _train(tiny_sd1, images, out).exit_code == 0
    _one_error_line(_train(tiny_sd1, images, out), "holds a finished run; choose another --out, or pass --overwrite")
    _one_error_line(_train(tiny_sd1, images, out, "--resume"), "resume checkpoints were deleted",
                    "nothing to resume")
    assert _train(tiny_sd1, images, out, "--overwrite").exit_code == 0
