"""Run a callback once a module is imported, whether that happened before or happens later.

``import share_transform`` must not import timm (the CLI's ``--help`` would wait seconds for it), yet the
package's models must be in timm's registry by the time a user calls ``timm.create_model``. So the package
asks for its registration to run right after timm's own import, or at once if timm is already loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence

__all__ = ["after_import"]


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the callback."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._callback()


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self._name = name
        self._callback = callback

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._name:
            return None
        sys.meta_path.remove(self)  # once; and the search below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self._callback)
        return spec


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` now if the top-level module ``name`` is loaded, else right after it loads."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _Finder) and f._name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(name, callback))
