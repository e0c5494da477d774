"""share_transform: turn residual networks into ShaResNets.

A ShaResNet (Boulch, "ShaResNet: reducing residual network parameter number by sharing weights",
arXiv 1702.08782) shares one spatial conv weight among the residual blocks of each stage. A torch.fx pass
finds the stages and blocks of any timm or torchvision ResNet / Wide-ResNet / ResNeXt and ties them:

    >>> import timm, share_transform
    >>> model = share_transform.apply(timm.create_model("resnet152"))
    >>> share_transform.count_parameters(model)  # 60,192,808 before
    36821032

Importing the package is cheap: torch, timm and the pass load on first use of a name below (PEP 562), so
``sharetx --help`` answers at once. The paper's CIFAR networks and the ShaResNets register with timm as soon
as timm is imported, before or after this package, so ``timm.create_model("sharesnet50")`` works after
``import share_transform``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._timm_hook import after_import
from .version import __version__ as __version__

#: The modules whose ``__all__`` together are the package's public API: each public name is listed once, in
#: its own module. Cheap (torch-free) modules first, so that looking up their names imports nothing heavy.
_API = (
    "errors",
    "policies",
    "build",
    "modelinfo",
    "tie",
    "warmstart",
    "planning",
    "trace",
    "signature",
    "summary",
    "files",
    "checkpoints",
    "export",
    "swrn",
    "models",
)

if TYPE_CHECKING:  # the same modules, for type checkers and IDEs (tests/test_package.py checks they agree)
    from .build import *  # noqa: F403
    from .checkpoints import *  # noqa: F403
    from .errors import *  # noqa: F403
    from .export import *  # noqa: F403
    from .files import *  # noqa: F403
    from .modelinfo import *  # noqa: F403
    from .models import *  # noqa: F403
    from .planning import *  # noqa: F403
    from .policies import *  # noqa: F403
    from .signature import *  # noqa: F403
    from .summary import *  # noqa: F403
    from .swrn import *  # noqa: F403
    from .tie import *  # noqa: F403
    from .trace import *  # noqa: F403
    from .warmstart import *  # noqa: F403


def _public_names() -> list[str]:
    return sorted(name for module in _API for name in importlib.import_module(f".{module}", __name__).__all__)


def __getattr__(name: str) -> Any:
    if name == "__all__":
        value: Any = _public_names()
    elif not name.startswith("_") and importlib.util.find_spec(f".{name}", __name__) is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule: share_transform.paper
    else:
        for module in _API:
            found = importlib.import_module(f".{module}", __name__)
            if name in found.__all__:
                value = getattr(found, name)
                break
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_public_names()))


def _register_timm_models() -> None:
    importlib.import_module(".models.registry", __name__).register_models()


after_import("timm", _register_timm_models)
