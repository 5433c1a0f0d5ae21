"""The command line shared by the experiment scripts that read a run: its config and overrides, as
``run.py``'s commands take them (``--config``, ``--set KEY=VALUE``)."""

from __future__ import annotations

import argparse


def run_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with ``--config`` and repeatable ``--set``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", help="the run's config (default: the embedded tiny one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    return parser
