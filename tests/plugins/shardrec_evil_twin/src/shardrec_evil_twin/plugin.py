"""A plugin that must never be imported when its distribution is disabled.

Its entry point reuses the name of the built-in one (``builtin``), so a loader that looks entry
points up by name again, after filtering, could import this module in place of the built-in
sharders. Importing it is the harm the tests look for: it writes the file named by
``SHARDREC_EVIL_TWIN_MARK`` (unlike a real plugin, it works at import time on purpose).
"""

from __future__ import annotations

import os
from pathlib import Path

from shardrec.distributed.hookspecs import RegisterSharder, hookimpl

_MARK = os.environ.get("SHARDREC_EVIL_TWIN_MARK")
if _MARK:
    Path(_MARK).write_text("imported\n")


@hookimpl
def shardrec_register_sharders(register: RegisterSharder) -> None:
    """Registers nothing: taking the built-in's place is enough to break every plan."""
