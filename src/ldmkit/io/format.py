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
import re
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
        raise FileNotFoundError(f"component folder {folder} "
                                + ("is not a folder" if folder.exists() else "does not exist"))
    from ldmkit.errors import UserError, known_bad_input, one_line, reading

    meta = read_json(folder / CONFIG_FILE)
    kind = meta.get("type")
    if not isinstance(kind, str) or kind not in COMPONENT_TYPES:
        raise UserError(f"{folder / CONFIG_FILE}: unknown component type {kind!r}; known: {sorted(COMPONENT_TYPES)}")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise UserError(f"{folder / CONFIG_FILE}: \"config\" must be a JSON object with the {kind} settings, "
                        f"got {json_kind(config) if 'config' in meta else 'nothing'}")
    weights = folder / WEIGHTS_FILE
    try:
        module = COMPONENT_TYPES[kind](config, folder)
    except ValueError as exc:  # a config value out of its range: name the file it came from
        if str(folder) in str(exc):
            raise
        raise UserError(f"{folder / CONFIG_FILE}: {exc}") from None
    except (MemoryError, RuntimeError) as exc:  # sizes within the checked ranges can still add up
        if known_bad_input(exc) != "not enough memory":
            raise
        raise UserError(f"{folder / CONFIG_FILE}: the {kind} it describes does not fit in memory "
                        f"({one_line(str(exc), 200)})") from None
    if not getattr(module, "weights_external", False):  # else from_component loaded and checked them
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing")
        with reading(f"weights file {weights}"):
            state = load_file(str(weights))
        if hasattr(module, "upgrade_state"):  # an older layout of the same weights
            state = module.upgrade_state(state)
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


_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
MAX_TIMESTEPS = 1_000_000  # the longest training schedule a model file may ask for


def check_schedule_dict(schedule: Any, where: str) -> None:
    """Types and ranges of a schedule's fields as a file holds them (before a schedule is built)."""
    from ldmkit.errors import UserError, check_int, check_number, check_str

    if not isinstance(schedule, dict):
        raise UserError(f"{where}: the schedule must be a JSON object, got {json_kind(schedule)}")
    try:
        for name, value in schedule.items():
            if name == "num_train_timesteps":
                check_int(f"schedule {name}", value, 2, MAX_TIMESTEPS)
            elif name == "steps_offset":
                check_int(f"schedule {name}", value, 0, MAX_TIMESTEPS)
            elif name in ("beta_start", "beta_end", "shift"):
                check_number(f"schedule {name}", value)
            elif name in ("beta_schedule", "timestep_spacing", "kind", "prediction_type"):
                check_str(f"schedule {name}", value, optional=name == "prediction_type")
            elif name == "rescale_zero_terminal_snr" and not isinstance(value, bool):
                raise UserError(f"schedule {name}={value!r} must be true or false")
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def check_model_index(index: dict, where: str) -> None:
    """The shape of an ldmkit model_index.json: component names, schedule, latent size, defaults."""
    from ldmkit.errors import UserError, check_ints, check_number, check_str

    try:
        names = index.get("components")
        if names is not None and (not isinstance(names, list) or not all(
                isinstance(n, str) and _COMPONENT_NAME.match(n) and n not in (".", "..") for n in names)):
            raise UserError(f"components={names!r} must be a list of component folder names")
        for key in ("defaults", "schedule"):
            if index.get(key) is not None and not isinstance(index[key], dict):
                raise UserError(f"{key} must be a JSON object, got {json_kind(index[key])}")
        defaults = index.get("defaults") or {}
        options = defaults.get("sampler_options")
        if options is not None and not isinstance(options, dict):
            raise UserError(f"defaults.sampler_options must be a JSON object, got {json_kind(options)}")
        for key in ("steps", "height", "width", "batch_size", "noise_level"):
            value = defaults.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise UserError(f"defaults.{key}={defaults[key]!r} must be an integer")
        for key in ("guidance", "guidance_rescale"):
            if defaults.get(key) is not None:
                check_number(f"defaults.{key}", defaults[key])
        check_str("defaults.sampler", defaults.get("sampler"), optional=True)
        if index.get("latent_size") is not None:
            check_ints("latent_size", index["latent_size"], 1, 65536, max_len=2)
        for key in ("conditioning", "concat", "objective"):
            check_str(key, index.get(key), optional=True)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    if index.get("schedule") is not None:
        check_schedule_dict(index["schedule"], where)


def pickle_refusal(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that says what the file pickles (not its advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines()
             if "GLOBAL" in ln or "Unsupported" in ln or "WeightsUnpickler error" in ln]
    if not lines:
        return "it is not a plain state dict of tensors"
    line = lines[0]
    return line[line.index("WeightsUnpickler error"):] if "WeightsUnpickler error" in line else line


def read_torch_weights(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict from a PyTorch checkpoint, read with `torch.load(weights_only=True)` only: a file that
    pickles anything but tensors is refused (nothing in it runs), a damaged one is a one-line error."""
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
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise UserError(f"{what} {path}: not a readable PyTorch checkpoint ({one_line(str(exc), 200)})") from None
        raise UserError(f"{what} {path}: refused: not a weights-only checkpoint, it pickles Python objects "
                        f"({one_line(pickle_refusal(exc), 200)}); nothing in it was run") from None
    except (EOFError, RuntimeError, KeyError, ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        # how torch.load reports a damaged or foreign file
        raise UserError(f"{what} {path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                        f"{one_line(str(exc), 200)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        kind = (f"a {type(obj).__name__}" if not isinstance(obj, dict) else "an empty dict" if not obj
                else "a dict with entries that are not tensors")
        raise UserError(f"{what} {path} holds {kind}, not a state dict of named tensors")
    return obj


def load_model(folder: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> tuple[dict, dict[str, torch.nn.Module]]:
    """Read a model folder in our format: returns (index, {component name: module})."""
    folder = Path(folder)
    index = read_json(folder / INDEX_FILE)
    if index.get("format") != FORMAT_NAME:
        raise ValueError(f"{folder / INDEX_FILE} is not an ldmkit model index (format={index.get('format')!r})")
    check_model_index(index, str(folder / INDEX_FILE))
    names = index.get("components") or [p.name for p in sorted(folder.iterdir()) if (p / CONFIG_FILE).is_file()]
    components = {}
    for name in names:
        component_dtype = dtype
        # SD's VAE overflows in float16: a model that says so keeps its autoencoder in float32
        if name == "autoencoder" and dtype == torch.float16 and (index.get("defaults") or {}).get("upcast_vae"):
            component_dtype = torch.float32
        components[name] = load_component(folder / name, device=device, dtype=component_dtype)
    return index, components
