"""ldmkit's own checkpoint format and atomic file writes.

A *component* folder holds one network: `config.json` ({"type", "config"}) and
`model.safetensors`, plus whatever extra files the component writes itself
(a tokenizer, say). A *model* folder wires components together:
`model_index.json` and one sub-folder per component (see docs/internals.md).

The set of component types is the explicit dict `COMPONENT_TYPES` below: a
type name maps to a builder `(config_dict, folder) -> nn.Module` that makes the
network with fresh weights; `load_component` then fills the weights in.
Nothing here imports arbitrary paths named in a file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

FORMAT_NAME = "ldmkit"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model_index.json"


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
        os.chmod(tmp, _file_mode())
        write(tmp)
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


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


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


# ----------------------------------------------------------------------------- component registry
def _autoencoder(cfg: dict, folder: Path):
    from ldmkit.autoencoder.model import Autoencoder, AutoencoderConfig

    return Autoencoder(config_from_dict(AutoencoderConfig, cfg))


def _unet(cfg: dict, folder: Path):
    from ldmkit.denoisers.unet import UNet, UNetConfig

    return UNet(config_from_dict(UNetConfig, cfg))


def _dit(cfg: dict, folder: Path):
    from ldmkit.denoisers.dit import DiT, DiTConfig

    return DiT(config_from_dict(DiTConfig, cfg))


def _conditioner(kind: str) -> Callable[[dict, Path], torch.nn.Module]:
    def build(cfg: dict, folder: Path):
        from ldmkit import conditioning as c

        classes = {"text-transformer": c.TransformerTextEncoder, "text-bert": c.BertTextEncoder,
                   "text-clip": c.CLIPTextEncoder, "class": c.ClassConditioner, "spatial": c.SpatialConditioner}
        return classes[kind].from_component(cfg, folder)

    return build


COMPONENT_TYPES: dict[str, Callable[[dict, Path], torch.nn.Module]] = {
    "autoencoder": _autoencoder,
    "unet": _unet,
    "dit": _dit,
    **{k: _conditioner(k) for k in ("text-transformer", "text-bert", "text-clip", "class", "spatial")},
}


def component_type_of(module: torch.nn.Module) -> str:
    kind = getattr(module, "component_type", None)
    if kind is None:
        kind = {"Autoencoder": "autoencoder", "UNet": "unet", "DiT": "dit"}.get(type(module).__name__)
    if kind not in COMPONENT_TYPES:
        raise ValueError(f"cannot save {type(module).__name__}: component type {kind!r} is not one of {sorted(COMPONENT_TYPES)}")
    return kind


# ----------------------------------------------------------------------------- save / load
def save_component(module: torch.nn.Module, folder: str | os.PathLike, extra_config: dict | None = None) -> Path:
    """Write `module` as a component folder (weights, config, and the module's own extra files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = component_type_of(module)
    config = config_to_dict(module.config)
    if getattr(module, "weights_external", False):  # frozen weights from an installed package: config names them
        (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    else:
        save_tensors(folder / WEIGHTS_FILE, module.state_dict(), metadata={"format": FORMAT_NAME, "type": kind})
    save_extra = getattr(module, "save_extra_files", None)
    if callable(save_extra):
        save_extra(folder)
    write_json(folder / CONFIG_FILE, {"type": kind, "config": config, **(extra_config or {})})
    return folder


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


def load_component(folder: str | os.PathLike, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Rebuild the network in a component folder and load its weights (safetensors only)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"component folder {folder} does not exist")
    meta = read_json(folder / CONFIG_FILE)
    kind = meta.get("type")
    if kind not in COMPONENT_TYPES:
        raise ValueError(f"{folder / CONFIG_FILE}: unknown component type {kind!r}; known: {sorted(COMPONENT_TYPES)}")
    weights = folder / WEIGHTS_FILE
    module = COMPONENT_TYPES[kind](meta.get("config", {}), folder)
    if not getattr(module, "weights_external", False):  # else from_component loaded and checked them
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing")
        state = load_file(str(weights))
        check_state_dict(module, state, str(weights))
        module.load_state_dict(state, strict=True)
    module.eval()
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    return module


def save_model(folder: str | os.PathLike, components: dict[str, torch.nn.Module], index: dict) -> Path:
    """Write a model folder: each component in its sub-folder, then model_index.json last
    (so a folder with an index is always complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in components.items():
        if module is not None:
            save_component(module, folder / name)
    full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **index,
            "components": sorted(k for k, v in components.items() if v is not None)}
    write_json(folder / INDEX_FILE, full)
    return folder


def is_ldmkit_model(path: str | os.PathLike) -> bool:
    index = Path(path) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return read_json(index).get("format") == FORMAT_NAME
    except ValueError:
        return False


def load_model(folder: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> tuple[dict, dict[str, torch.nn.Module]]:
    """Read a model folder in our format: returns (index, {component name: module})."""
    folder = Path(folder)
    index = read_json(folder / INDEX_FILE)
    if index.get("format") != FORMAT_NAME:
        raise ValueError(f"{folder / INDEX_FILE} is not an ldmkit model index (format={index.get('format')!r})")
    names = index.get("components") or [p.name for p in sorted(folder.iterdir()) if (p / CONFIG_FILE).is_file()]
    components = {}
    for name in names:
        component_dtype = dtype
        # SD's VAE overflows in float16: a model that says so keeps its autoencoder in float32
        if name == "autoencoder" and dtype == torch.float16 and (index.get("defaults") or {}).get("upcast_vae"):
            component_dtype = torch.float32
        components[name] = load_component(folder / name, device=device, dtype=component_dtype)
    return index, components
