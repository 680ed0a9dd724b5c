"""Quiet, lazy access to third-party libraries: diffusers and transformers without their progress bars and
advice, and bitsandbytes, prodigyopt and lion-pytorch only where a run asks for them (`memory.optimizer`).

    from sdtune.util.libraries import import_bitsandbytes, import_optimizer_package, quiet_libraries
    quiet_libraries()            # before a command first loads a diffusers model
    bnb = import_bitsandbytes()  # the 8-bit optimizer's library, imported without its import-time chatter
    prodigyopt = import_optimizer_package("prodigy")   # or a one-line error naming `pip install 'sdtune[prodigy]'`

Why bitsandbytes needs keeping out: diffusers imports it, when installed, as soon as its model code loads
(`diffusers.models.modeling_utils` -> `diffusers.quantizers` -> `quantizers/bitsandbytes/utils.py`, for
loading 4/8-bit quantised checkpoints, which sdtune never does). The import costs about a second and, on a
CPU without the `kernels` package, logs "Failed to load CPU gemm_4bit_forward from kernels-community" in
every sdtune command. peft (0.21 and later) imports it too, at its own import, which diffusers' pipeline
modules trigger; so `quiet_libraries` also keeps bitsandbytes' loggers to errors.
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
    itself), keep diffusers from importing bitsandbytes, and bitsandbytes' warnings out. Call it before
    the first diffusers model class is imported; later, the bitsandbytes part no longer helps."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read once, when transformers is first imported
    from diffusers.utils import import_utils as diffusers_imports
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # diffusers' quantizer module imports bitsandbytes when this flag (set at import, from find_spec) is
    # true; sdtune loads no quantised models, and imports bitsandbytes itself for adamw8bit
    diffusers_imports._bitsandbytes_available = False
    # peft imports bitsandbytes whatever that flag says; its import-time warnings are about kernels
    # (4-bit CPU gemm) that sdtune never calls, and its errors still show
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def import_bitsandbytes() -> ModuleType:
    """The `bitsandbytes` module, with what its import prints, logs or warns (such as the kernels-community
    line above) kept out of the output; a one-line `SdtuneError` where it is missing or fails to import."""
    logger = logging.getLogger("bitsandbytes")  # the parent of the loggers its backends warn through
    level = logger.level
    logger.setLevel(logging.ERROR)  # where a handler is configured, sys.stderr's redirection does not reach it
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
    except Exception as exc:  # ImportError, or a broken native library (OSError, RuntimeError)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SdtuneError(f"memory.optimizer=adamw8bit needs bitsandbytes ({reason}); "
                          "pip install bitsandbytes or set memory.optimizer=adamw") from None
    finally:
        logger.setLevel(level)
    return bitsandbytes


OPTIMIZER_PACKAGES = {"prodigy": ("prodigyopt", "prodigyopt"), "lion": ("lion_pytorch", "lion-pytorch")}
"""`memory.optimizer` -> (the module it imports, its pip package); sdtune's extra of the same name installs it."""


def import_optimizer_package(optimizer: str) -> ModuleType:
    """The module of `memory.optimizer=optimizer` (prodigy, lion: packages outside sdtune's core
    dependencies); a one-line `SdtuneError` naming sdtune's pip extra where it is missing."""
    import importlib

    module, package = OPTIMIZER_PACKAGES[optimizer]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SdtuneError(f"memory.optimizer={optimizer} needs {package} ({reason}); pip install "
                          f"'sdtune[{optimizer}]' (or {package}), or set memory.optimizer=adamw") from None
