"""Shared launcher helpers."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app

from jaxrl_sparse.errors import UserError


def run_main(main: Callable) -> None:
    """`absl.app.run(main)`, but a `UserError` prints `error: <msg>` and exits with status 2."""

    def wrapped(argv):
        from absl import flags, logging
        if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)


def _field_comments(cls) -> dict:
    """`name: type = default  # comment` -> {name: comment}, read from the dataclass source."""
    import inspect
    import re
    out = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:\s*[^=]+=\s*.*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def define_flags_from_config(cls, *, defaults: dict | None = None, skip: tuple = ()) -> None:
    """One absl flag per field of the frozen config dataclass `cls` (help = the field's comment).

    Keeps launchers thin: the dataclass is the single list of knobs, the flags mirror it.
    """
    import dataclasses

    from absl import flags
    helps = _field_comments(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        help_ = helps.get(f.name, f.name)
        if f.type in (bool, "bool"):
            flags.DEFINE_bool(f.name, default, help_)
        elif f.type in (int, "int"):
            flags.DEFINE_integer(f.name, default, help_)
        elif f.type in (float, "float"):
            flags.DEFINE_float(f.name, default, help_)
        else:
            flags.DEFINE_string(f.name, default, help_)


def config_from_flags(cls, **extra):
    """Builds `cls` from the parsed absl flags of the same names."""
    import dataclasses

    from absl import flags
    F = flags.FLAGS
    kw = {f.name: F[f.name].value for f in dataclasses.fields(cls) if f.name in F}
    kw.update(extra)
    return cls(**kw)
