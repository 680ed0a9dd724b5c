"""Quiet, lazy access to third-party libraries: diffusers and transformers without their progress bars and
advice, and the optional optimizers' packages (bitsandbytes, prodigyopt, lion-pytorch: sdtune's extras of
the `memory.optimizer` they serve) imported only where a run asks for them, or one line naming the extra.

    from sdtune.util.libraries import import_optimizer_package, quiet_libraries
    quiet_libraries()            # before a command first loads a diffusers model
    bnb = import_optimizer_package("adamw8bit")   # or a one-line error naming `pip install 'sdtune[adamw8bit]'`

Why bitsandbytes is an extra (`sdtune[adamw8bit]`), not a core dependency: it is some 125 MB of CUDA
kernels that only `memory.optimizer=adamw8bit` uses, and only on a GPU (OneTrainer installs it with its
CUDA requirements only); on a CPU it imports, but logs "Failed to load CPU gemm_4bit_forward from
kernels-community" and costs seconds. diffusers and peft import it at their own import whenever it is
installed (diffusers' quantizers; there is no public switch to stop that), so `quiet_libraries` keeps
bitsandbytes' loggers to errors and `import_optimizer_package` keeps its import-time chatter out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from types import ModuleType

from sdtune.errors import SdtuneError


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' per-file progress bars and advice (sdtune reports progress
    itself), and bitsandbytes' warnings (diffusers and peft import it when it is installed; they are about
    4-bit kernels sdtune never calls, and its errors still show). Call it before the first diffusers model
    class is imported."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read once, when transformers is first imported
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


OPTIMIZER_PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt"),
                      "lion": ("lion_pytorch", "lion-pytorch")}
"""`memory.optimizer` -> (the module it imports, its pip package); sdtune's extra of the same name installs it."""


def import_optimizer_package(optimizer: str) -> ModuleType:
    """The module of `memory.optimizer=optimizer` (adamw8bit, prodigy, lion: packages outside sdtune's core
    dependencies), with what its import prints, logs or warns kept out of the output; a one-line
    `SdtuneError` naming sdtune's pip extra where it is missing or fails to import."""
    module, package = OPTIMIZER_PACKAGES[optimizer]
    try:
        return _import_quietly(module)
    except Exception as exc:  # ImportError, or a broken native library (OSError, RuntimeError)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SdtuneError(f"memory.optimizer={optimizer} needs {package} ({reason}); pip install "
                          f"'sdtune[{optimizer}]' (or {package}), or set memory.optimizer=adamw") from None


def _import_quietly(module: str) -> ModuleType:
    """`module` imported with its stdout, stderr, warnings and bitsandbytes-style log lines kept out."""
    import importlib

    logger = logging.getLogger(module)  # the parent of the loggers its backends warn through
    level = logger.level
    logger.setLevel(logging.ERROR)  # where a handler is configured, sys.stderr's redirection does not reach it
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    finally:
        logger.setLevel(level)
