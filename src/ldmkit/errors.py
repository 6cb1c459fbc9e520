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
    "yaml.error.YAMLError": "not valid YAML",
    "torch.OutOfMemoryError": "not enough memory",
}
# torch reports a failed CPU allocation as a plain RuntimeError; this is its message
_OUT_OF_MEMORY_TEXT = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory")


def known_bad_input(exc: BaseException) -> str | None:
    """A short description when `exc` is one of the readers' bad-input errors, else None."""
    for cls in type(exc).__mro__:
        hit = _KNOWN.get(f"{cls.__module__}.{cls.__qualname__}")
        if hit:
            return hit
    if isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OUT_OF_MEMORY_TEXT):
        return "not enough memory"
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


# ----------------------------------------------------------------------------- checking values
def _is_int(value) -> bool:
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, lo: int, hi: int, optional: bool = False) -> None:
    """Refuse `value` unless it is an integer in [lo, hi] (or None when `optional`), naming `name`."""
    if value is None and optional:
        return
    if not _is_int(value) or not lo <= value <= hi:
        none = " or null" if optional else ""
        raise UserError(f"{name}={value!r} must be an integer in [{lo}, {hi}]{none}")


def check_ints(name: str, value, lo: int, hi: int, min_len: int = 1, max_len: int = 64) -> None:
    """Refuse `value` unless it is a list/tuple of min_len..max_len integers in [lo, hi]."""
    if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len \
            or not all(_is_int(v) and lo <= v <= hi for v in value):
        raise UserError(f"{name}={value!r} must be a list of {min_len} to {max_len} integers in [{lo}, {hi}]")


def check_number(name: str, value, lo: float = float("-inf"), hi: float = float("inf"), optional: bool = False,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """Refuse `value` unless it is a finite number in the range (brackets per lo_open / hi_open)."""
    import math
    import numbers

    if value is None and optional:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        if math.isinf(lo) and math.isinf(hi):
            rng = ""
        elif math.isinf(hi):
            rng = f" {'>' if lo_open else '>='} {lo:g}"
        elif math.isinf(lo):
            rng = f" {'<' if hi_open else '<='} {hi:g}"
        else:
            rng = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise UserError(f"{name}={value!r} must be a finite number{rng}" + (" or null" if optional else ""))


def check_str(name: str, value, choices=None, optional: bool = False) -> None:
    """Refuse `value` unless it is a string (one of `choices` when given)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or (choices is not None and value not in choices):
        allowed = f" one of {sorted(c for c in choices if c is not None)}" if choices is not None else " a string"
        raise UserError(f"{name}={value!r} must be{allowed}")


def check_text(name: str, text: str) -> None:
    """Refuse text that holds undecodable bytes (arguments decoded with surrogateescape, say)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{name} {one_line(ascii(text), 80)} is not valid UTF-8 text (it holds undecodable "
                        "bytes); pass it in UTF-8") from None


def check_device(name: str, flag: str = "--device"):
    """`name` as a torch.device that exists here (imports torch when called)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag} {name!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"{flag} {name!r}: ldmkit runs on cpu or cuda")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {name!r}: MPS is not available on this machine")
    return device
