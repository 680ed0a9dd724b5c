"""Third-party noise stays out of sdtune's output: loading a model does not import bitsandbytes (whose import
logs "Failed to load CPU gemm_4bit_forward from kernels-community"), and importing it for adamw8bit is silent."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from sdtune.errors import SdtuneError
from sdtune.util.libraries import import_optimizer_package

ROOT = Path(__file__).resolve().parents[2]
NOISE = ("kernels-community", "gemm_4bit")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_sdtune_sample_prints_no_bitsandbytes_noise(tiny_sd1, tmp_path):
    """peft (installed for LoRA) imports bitsandbytes when diffusers loads a model, so the module may be
    loaded; what the user sees must stay clean: none of its banner lines."""
    code = ("import sys\nfrom sdtune.cli import app\n"
            "app(sys.argv[1:], standalone_mode=False)\n"
            "print('bitsandbytes imported:', 'bitsandbytes' in sys.modules)\n")
    result = _python(code, "sample", "--ckpt", str(tiny_sd1), "--prompt", "a red circle", "--num-images", "1",
                     "--steps", "1", "--out", str(tmp_path / "samples"))
    assert result.returncode == 0, result.stderr
    assert "bitsandbytes imported:" in result.stdout
    assert not [line for line in result.stderr.splitlines() if any(word in line for word in NOISE)], result.stderr
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_import_bitsandbytes_prints_nothing():
    result = _python("from sdtune.util.libraries import import_optimizer_package as load\n"
                     "print(load('adamw8bit').__name__, load('adamw8bit').optim.AdamW8bit.__name__)")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("bitsandbytes AdamW8bit\n", "")


def test_import_bitsandbytes_returns_the_module_quietly_here_too(capfd):
    level = logging.getLogger("bitsandbytes").level  # ERROR once `quiet_libraries` has run in this process
    assert import_optimizer_package("adamw8bit").__name__ == "bitsandbytes"
    assert capfd.readouterr() == ("", "")
    assert logging.getLogger("bitsandbytes").level == level  # restored


def test_a_missing_bitsandbytes_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what importing an absent package raises
    with pytest.raises(SdtuneError) as missing:
        import_optimizer_package("adamw8bit")
    message = str(missing.value)
    assert message.startswith("memory.optimizer=adamw8bit needs bitsandbytes (") and "\n" not in message
    assert message.endswith("; pip install 'sdtune[adamw8bit]' (or bitsandbytes), or set memory.optimizer=adamw")


def test_bitsandbytes_is_the_adamw8bit_extra_not_a_core_dependency():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("bitsandbytes")]
    assert project["optional-dependencies"]["adamw8bit"] == ["bitsandbytes>=0.43"]
    assert "bitsandbytes>=0.43" in project["optional-dependencies"]["dev"]  # make install, CI: the tests use it
