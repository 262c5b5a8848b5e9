"""Shared launcher helpers."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app

from jaxrl_sparse.errors import UserError


def run_main(main: Callable) -> None:
    """`absl.app.run(main)`, but a `UserError` prints `error: <msg>` and exits with status 2."""

    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)
