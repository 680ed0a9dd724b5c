"""The one exception type for problems a user can fix.

Anything raised as `SdtuneError` is printed by the CLI as a single line (what is wrong, and how to fix
it) with a non-zero exit; any other exception is a bug in sdtune and keeps its traceback.
"""


class SdtuneError(Exception):
    """A user-fixable problem: bad input, a missing file, a contradictory plan."""


class HostOutOfMemory(SdtuneError):
    """Host RAM (or page-locked memory) ran out while the offload engine allocated its buffers."""
