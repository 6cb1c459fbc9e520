"""Bad input from users, and how the `ldm` command reports it.

`UserError` is what library code raises when the user gave something it cannot use (a file, a
value, a flag). It is a `ValueError`, so Python callers catch it as one; the `ldm` command prints
it as one line and exits with code 2. `describe(exc)` turns the exceptions that third-party
readers raise on bad files (safetensors, PIL, pickle, JSON, text decoding) into the same kind of
one-line message; anything it does not know stays a bug and keeps its traceback.

This module imports nothing heavy: the command line loads it before torch.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


# exception class names (module-qualified) that mean "this file or value is unusable", with a prefix
_KNOWN = {
    "safetensors._safetensors_rust.SafetensorError": "not a readable safetensors file",
    "safetensors.SafetensorError": "not a readable safetensors file",
    "PIL.Image.DecompressionBombError": "image too large",
    "PIL.UnidentifiedImageError": "not a readable image",
    "_pickle.UnpicklingError": "refused: not a weights-only checkpoint",
    "pickle.UnpicklingError": "refused: not a weights-only checkpoint",
    "json.decoder.JSONDecodeError": "not valid JSON",
    "builtins.UnicodeDecodeError": "not valid UTF-8 text",
    "builtins.UnicodeEncodeError": "text that cannot be encoded",
    "builtins.OverflowError": "a value too large",
    "builtins.MemoryError": "not enough memory",
}


def known_bad_input(exc: BaseException) -> str | None:
    """A short description when `exc` is one of the readers' bad-input errors, else None."""
    for cls in type(exc).__mro__:
        hit = _KNOWN.get(f"{cls.__module__}.{cls.__qualname__}")
        if hit:
            return hit
    return None


def one_line(text: str, limit: int = 400) -> str:
    """`text` folded to one line of at most `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe(exc: BaseException, where: str | None = None) -> str:
    """The one-line message the command prints for a user error (`where`: what was being read)."""
    kind = known_bad_input(exc)
    detail = one_line(str(exc))
    if kind and where:
        return one_line(f"{where}: {kind} ({detail})" if detail else f"{where}: {kind}")
    if kind:
        return one_line(f"{kind}: {detail}" if detail else kind)
    return one_line(f"{where}: {detail}" if where else detail)


def reading(where: str):
    """Context manager: a known bad-input error raised inside becomes a UserError naming `where`.

        with reading(f"weights file {path}"):
            state = safetensors.torch.load_file(path)
    """
    return _Reading(where)


class _Reading:
    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and not isinstance(exc, UserError) and known_bad_input(exc):
            raise UserError(describe(exc, self.where)) from None
        return False
