"""The ``rl`` extra's packages (gymnax, rlax), imported on first use (private).

``import lepton_mm.rl`` imports neither (together about 4 s and 160 MB installed): the
functions that need one call ``require`` when they run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: How to install the extra, for messages.
INSTALL = "pip install 'lepton_mm[rl]' (in a checkout: pip install -e \".[rl]\")"


def require(name: str) -> ModuleType:
    """``import name``, for a package of the ``rl`` extra.

    Args:
      name: ``"gymnax"`` or ``"rlax"``.

    Returns:
      The module.

    Raises:
      ImportError: it (or one of its dependencies) is not installed; the message names
        the ``rl`` extra and how to install it.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise ImportError(f"lepton_mm.rl needs {name} ({error.name} is missing), from the "
                          f"optional 'rl' extra: {INSTALL}.") from error
