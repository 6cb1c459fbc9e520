"""Files at the library's edge: atomic writes, a writer lock on output folders, JSON and safetensors
I/O, config dataclasses from JSON, and the one way pickle-based files are read (weights-only).

Every file ldmkit writes goes through `atomic_write` (temporary file, fsync, rename), so a reader
sees the old file or the complete new one, never a torn write, even if the process is killed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

# ----------------------------------------------------------------------------- atomic writes
def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask (mkstemp would give 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path`.

    A reader sees either the old file or the complete new one, never a torn write,
    even if the process is killed midway.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # after the write: a writer may replace the file (safetensors does)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


TMP_SUFFIX = ".tmp"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the `.NAME.*.tmp` files an atomic write killed midway left in `folder` (the target
    files themselves are intact); call it only while holding the folder's `FolderLock`."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class FolderLock:
    """An exclusive lock on a folder a command writes into (`OUT/.lock`, flock): a second writer
    is refused at once with a message naming the folder. The kernel drops the lock when the
    process ends, however it ends, so a killed run never leaves a stale lock behind.

        with FolderLock(out, "ldm train"):
            ...
    """

    def __init__(self, folder: str | os.PathLike, what: str = "a command"):
        self.folder, self.what, self._fd = Path(folder), what, None

    def acquire(self) -> "FolderLock":
        import fcntl

        from ldmkit.errors import UserError

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, _file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{self.folder} is in use by another process (another {self.what} writes "
                            "there); wait for it to finish or choose another output folder") from None
        os.truncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):  # a lock nobody releases goes with its object (a Trainer built and never run)
        self.release()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    return atomic_write(path, write)


_JSON_KINDS = {dict: "a JSON object", list: "a JSON array", str: "a JSON string", int: "a JSON integer",
               float: "a JSON number", bool: "true or false", type(None): "null"}


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words ("a JSON array", "null" ...)."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def read_json(path: str | os.PathLike, expect: type | tuple | None = dict) -> Any:
    """Parse a JSON file; `expect` (default dict: a JSON object) is the type its top level must have
    (None: anything). Bad bytes, bad syntax and the wrong shape are `UserError`s naming the file."""
    from ldmkit.errors import UserError, reading

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    with reading(str(path)):
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    if expect is not None and not isinstance(value, expect):
        kinds = expect if isinstance(expect, tuple) else (expect,)
        want = " or ".join(_JSON_KINDS.get(k, k.__name__) for k in kinds)
        raise UserError(f"{path} must hold {want}, got {json_kind(value)}")
    return value


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written atomically; tensors made contiguous and unshared first."""
    flat, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous()
        ptr = (v.device, v.untyped_storage().data_ptr())
        flat[k] = v.clone() if ptr in seen else v  # safetensors refuses tensors that share memory (tied weights)
        seen.add(ptr)
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


# ----------------------------------------------------------------------------- configs
def config_to_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"config must be a dataclass or dict, got {type(config).__name__}")


def _coerce(value: Any, annotation: Any) -> Any:
    """Lists from JSON back to tuples where the dataclass field is a tuple."""
    if isinstance(value, list):
        origin = typing.get_origin(annotation)
        text = str(annotation)
        if origin is tuple or text.startswith("tuple") or "Tuple" in text or "tuple[" in text:
            return tuple(_coerce(v, Any) for v in value)
        return [_coerce(v, Any) for v in value]
    return value


def config_from_dict(cls: type, data: dict) -> Any:
    """Build the frozen dataclass `cls` from a JSON dict; unknown keys are an error naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints.get(k, Any)) for k, v in data.items()})


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Refuse missing/unexpected keys and shape mismatches with a message naming the tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatch(es): " + "; ".join(bad_shapes[:5]))
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise ValueError(f"weights in {source} do not fit {type(module).__name__}: " + " | ".join(problems))


def pickle_refusal(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that says what the file pickles (not its advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines()
             if "GLOBAL" in ln or "Unsupported" in ln or "WeightsUnpickler error" in ln]
    if not lines:
        return "it is not a plain state dict of tensors"
    line = lines[0]
    return line[line.index("WeightsUnpickler error"):] if "WeightsUnpickler error" in line else line


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", map_location="cpu"):
    """`torch.load(path, weights_only=True)` -- the only way ldmkit reads a pickle-based file: a file that
    pickles anything but tensors and plain containers is refused (nothing in it runs), a damaged or
    foreign one is a one-line error."""
    import pickle
    import struct
    import warnings

    from ldmkit.errors import UserError, one_line

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in damaged files
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) or "GLOBAL" not in str(exc):  # damaged, not malicious
            raise UserError(f"{what} {path}: not a readable PyTorch file ({one_line(str(exc), 200)})") from None
        raise UserError(f"{what} {path}: refused: not a weights-only file, it pickles Python objects "
                        f"({one_line(pickle_refusal(exc), 200)}); nothing in it was run") from None
    except (EOFError, RuntimeError, KeyError, ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        # how torch.load reports a damaged or foreign file
        raise UserError(f"{what} {path}: not a readable PyTorch file ({type(exc).__name__}: "
                        f"{one_line(str(exc), 200)})") from None


def read_torch_weights(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict from a PyTorch checkpoint (`load_torch_file`), checked to be named tensors."""
    from ldmkit.errors import UserError

    obj = load_torch_file(path, what)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        kind = (f"a {type(obj).__name__}" if not isinstance(obj, dict) else "an empty dict" if not obj
                else "a dict with entries that are not tensors")
        raise UserError(f"{what} {path} holds {kind}, not a state dict of named tensors")
    return obj
