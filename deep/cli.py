"""What every command of the project owes bad input: one line, ``PROG: error: ...``, and exit status 2. Used by the
offline converters (``python -m deep.weights``, ``python -m deep.perceptual``) and by the scripts' parsers
(experiments/_common.py). Light on purpose: a script parses its flags before it imports JAX.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: ...``, without the usage) and exit with status 2;
    its sub-commands' parsers are of this class too."""

    def error(self, message: str):  # noqa: D401 (argparse's name)
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_command(prog: str, command: Callable[[], str]) -> int:
    """Runs a command-line action that returns its report: prints the report and returns 0, or prints one line
    ``PROG: error: ...`` to stderr and returns 2 on bad input (a missing, unreadable or mismatched file, no
    PyTorch)."""
    try:
        message = command()
    except (ValueError, ImportError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(message)
    return 0
