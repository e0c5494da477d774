"""``sharetx``: the command line of share_transform (commands arrive with the CLI issue)."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sharetx")
def main() -> None:
    """Turn residual networks into ShaResNets (one shared spatial conv weight per stage)."""
