"""Figures without a display: matplotlib, an optional dependency (the ``[train]`` extra), loaded on demand.

The core (``sharetx sweep --plot``) and the training stack (``curves.png``, the report's figures) draw through
:func:`new_figure`, so neither touches matplotlib's global backend and a missing matplotlib is one clear error.
"""

from __future__ import annotations

from typing import Any

from .errors import MissingExtraError

__all__ = ["new_figure", "require_matplotlib"]


def require_matplotlib() -> None:
    """Check that matplotlib, which draws every figure of the package, is installed.

    Raises:
        MissingExtraError: it is not; the message names the extra that installs it.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(
            f"matplotlib draws the plots and figures ({e}): pip install 'share-transform[train]'"
        ) from None


def new_figure(figsize: tuple[float, float], **kwargs: Any) -> Any:
    """A matplotlib ``Figure`` on its own Agg canvas: no display needed, matplotlib's global backend untouched.

    Raises:
        MissingExtraError: matplotlib is not installed (see :func:`require_matplotlib`).
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)
    return fig
