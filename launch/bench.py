"""Benchmark dispatcher: `python -m launch.bench {generate,ppo,es,grpo,analyze,head,profile} [--flags]`.

The table of benchmarks and the dispatch live in `jaxrl_sparse.bench` (the profiler wraps them).
"""
from __future__ import annotations

import sys
from typing import List, Optional

from jaxrl_sparse.bench import COMMANDS, dispatch  # noqa: F401  (COMMANDS: re-exported for callers)
from jaxrl_sparse.errors import UserError


def main(argv: Optional[List[str]] = None) -> None:
    try:
        dispatch(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
