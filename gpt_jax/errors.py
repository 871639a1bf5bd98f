"""The error convention every command shares: expected failures become one line on stderr and an exit code.

    2  a setting, command-line argument, input file, data source, tokenizer or prompt is wrong
    3  training stopped on a non-finite loss
    4  the run directory is in use, or holds a run or checkpoint that does not match the command
    5  the file system refused: permission denied, read-only, no space left, not a directory
    6  a weights file is unsafe or malformed

Anything else is a bug and keeps its traceback (exit 1). Commands parse with `ArgumentParser`, which
reports a wrong command line the same way, and read numbers with `number`, which checks a range in the
notation of config.RANGES (`in_range`, `range_text`).
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import sys

EXIT_USAGE, EXIT_NONFINITE, EXIT_RUN, EXIT_FILESYSTEM, EXIT_WEIGHTS = 2, 3, 4, 5, 6

# (module, class, exit code), most specific first; subclasses count too. Classes are matched by name,
# so nothing is imported to check, and a module run as `python -m` (__main__) still matches.
_EXPECTED = (
    ("gpt_jax.pretrained", "WeightsError", EXIT_WEIGHTS),
    ("gpt_jax.rundir", "RunDirError", EXIT_RUN),
    ("gpt_jax.checkpoint", "CheckpointError", EXIT_RUN),
    ("gpt_jax.config", "ConfigError", EXIT_USAGE),
    ("gpt_jax.corpora", "DataError", EXIT_USAGE),
    ("gpt_jax.tokenizer", "TokenizerError", EXIT_USAGE),
    ("gpt_jax.generate", "GenerateError", EXIT_USAGE),
    ("builtins", "FloatingPointError", EXIT_NONFINITE),
)
_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FILESYSTEM = _SPACE | {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}


def _filesystem_error(e: BaseException) -> str | None:
    """One line for a refusal of the file system anywhere in the exception's chain, else None. Orbax's
    TensorStore writes raise ValueError with the errno in the text (os_error_code='28')."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code, path = (e.errno, e.filename) if isinstance(e, OSError) else (None, None)
        if code is None and (m := re.search(r"os_error_code='(\d+)'", str(e))):
            code, quoted = int(m.group(1)), re.search(r'"(/[^"]+)"', str(e))
            path = quoted and quoted.group(1)
        if code in _FILESYSTEM:
            where = f": {path}" if path else ""
            fix = ("free some space or point train.out_dir / data.cache_dir elsewhere, then rerun the same "
                   "command (a run resumes from its last complete checkpoint)") if code in _SPACE else \
                "check the path and its permissions, or choose another location"
            return f"{os.strerror(code)}{where}; {fix}"
        e = e.__cause__ or e.__context__
    return None


def _module(cls) -> str:
    if cls.__module__ == "__main__":  # python -m gpt_jax.data: the module's real name is in its spec
        return getattr(getattr(sys.modules["__main__"], "__spec__", None), "name", "__main__")
    return cls.__module__


def explain(e: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for an expected failure, None for anything else."""
    classes = {(_module(c), c.__qualname__) for c in type(e).__mro__}
    for module, name, code in _EXPECTED:
        if (module, name) in classes:
            return code, str(e)
    message = _filesystem_error(e)
    return (EXIT_FILESYSTEM, message) if message else None


def entry_point(main):
    """Wrap a command's main: an expected failure prints `error: ...` (one line) and returns its code."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as e:
            known = explain(e)
            if known is None:
                raise
            print(f"error: {known[1]}", file=sys.stderr, flush=True)
            return known[0]

    return wrapped


def in_range(value, spec: str) -> bool:
    """Whether `value` lies in `spec`: an interval "[a, b)" ("inf" for no bound) or "... or x" for a special
    value, the notation of config.RANGES. NaN lies in no interval."""
    interval, _, special = spec.partition(" or ")
    if special and value == float(special):
        return True
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return (lo < value if interval[0] == "(" else lo <= value) and (value < hi if interval[-1] == ")" else value <= hi)


def range_text(spec: str) -> str:
    """"[1, inf)" -> ">= 1", "(0, inf)" -> "> 0", else "in [0, 1)"."""
    interval, _, special = spec.partition(" or ")
    lo, hi = (x.strip() for x in interval[1:-1].split(","))
    text = (">= " if interval[0] == "[" else "> ") + lo if hi == "inf" else f"in {interval}"
    return text + (f" (or {special})" if special else "")


def number(spec: str, kind: type = int):
    """An argparse type: an int (or, with kind=float, a number) in `spec`, an interval as config.RANGES
    writes them. Commands bound every number above too: a value that reaches a compiled program must
    fit its int32 / float32, and no one means a billion samples. NaN, infinities and words are refused."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not in_range(value, spec):
            raise argparse.ArgumentTypeError(f"must be {range_text(spec)}, got {text}")
        return value

    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a wrong command line is reported as every expected failure is: one `error:`
    line naming the argument and what it must be, exit code 2, before anything is loaded or compiled."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")
