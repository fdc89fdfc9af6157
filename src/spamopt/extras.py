"""Optional dependencies, imported on use with a message naming the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` saying ``pip install 'spamopt[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = package or module
        raise ImportError(
            f"this needs the `{package}` package: pip install 'spamopt[{extra}]' (or pip install {package})"
        ) from error
