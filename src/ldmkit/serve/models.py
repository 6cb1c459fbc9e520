"""The server's models, loaded once and kept warm, and its LoRA / ControlNet folders.

Requests name things; they never give paths. A model is picked by its name ("demo-shapes"), its
A1111 title ("demo-shapes [fa33078044]") or its hash; a LoRA or ControlNet by its name in the
folder the operator gave (`--lora-dir`, `--controlnet-dir`), looked up in a listing of that
folder. No request string is ever joined to a path.
"""
from __future__ import annotations

import re
from pathlib import Path

from ldmkit.errors import UserError

LORA_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\s*$")  # "name [hash]": A1111's titles


def title(name: str, model_hash: str | None) -> str:
    return f"{name} [{model_hash}]" if model_hash else name


def bare_name(text: str) -> str:
    """A1111 titles name things "name [hash]"; the name alone."""
    return _TITLE_HASH.sub("", str(text)).strip()


class ModelSet:
    """The models of `ldm serve --model ...`, by name; `current` is the one requests use by default."""

    def __init__(self, specs: list[str], device=None, dtype=None, lora_dir=None, controlnet_dir=None, log=print):
        from ldmkit.pipelines import load

        self.pipes: dict = {}
        for spec in specs:
            pipe = load(spec, device=device, dtype=dtype)
            name = pipe.model_name or Path(spec).name
            if name in self.pipes:
                raise UserError(f"--model {spec}: a model named {name!r} is already loaded; give models distinct "
                                "folder or file names")
            pipe.step_hook = None
            self.pipes[name] = pipe
            log(f"ldm serve: model {name} [{pipe.model_hash}] loaded on {pipe.device} ({', '.join(pipe.tasks)})")
        self.current = next(iter(self.pipes))
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.controlnet_dir = Path(controlnet_dir) if controlnet_dir else None
        self._controlnets: dict = {}  # (path, mtime) -> ControlNet, kept warm

    def find(self, text: str | None) -> str:
        """The model a request names (name, title or hash); None: the current model."""
        if text in (None, ""):
            return self.current
        text = str(text).strip()
        for name, pipe in self.pipes.items():
            if text in (name, title(name, pipe.model_hash), pipe.model_hash) or bare_name(text) == name:
                return name
        raise KeyError(f"no loaded model is called {text!r}; loaded: {', '.join(self.titles())}")

    def titles(self) -> list[str]:
        return [title(n, p.model_hash) for n, p in self.pipes.items()]

    def listing(self) -> list[dict]:
        """GET /sdapi/v1/sd-models."""
        return [{"title": title(n, p.model_hash), "model_name": n, "hash": p.model_hash, "sha256": None,
                 "filename": n, "config": None, "tasks": p.tasks} for n, p in self.pipes.items()]

    # ------------------------------------------------------------------ LoRAs and ControlNets
    def loras(self) -> dict[str, Path]:
        """LoRA files of --lora-dir (and its subfolders) by file name without suffix."""
        return _files(self.lora_dir, LORA_SUFFIXES)

    def controlnet_paths(self) -> dict[str, Path]:
        """ControlNets of --controlnet-dir: diffusers folders (with a config.json) and single files."""
        if self.controlnet_dir is None or not self.controlnet_dir.is_dir():
            return {}
        found = {p.parent.name: p.parent for p in sorted(self.controlnet_dir.glob("*/config.json"))}
        found.update(_files(self.controlnet_dir, CONTROLNET_SUFFIXES, recursive=False))
        return found

    def lora_path(self, name: str) -> Path:
        loras = self.loras()
        if name not in loras:
            raise KeyError(f"no LoRA is called {name!r}" + (f"; available: {', '.join(sorted(loras))}" if loras
                                                             else " (the server has no --lora-dir)"))
        return loras[name]

    def controlnet(self, name: str, pipe):
        """The ControlNet called `name` on `pipe`'s device, read once and kept."""
        from ldmkit.io.controlnet_files import check_fits, read_controlnet

        paths = self.controlnet_paths()
        key = bare_name(name)
        if key not in paths:
            raise KeyError(f"no ControlNet is called {name!r}" + (f"; available: {', '.join(sorted(paths))}" if paths
                                                                   else " (the server has no --controlnet-dir)"))
        path = paths[key]
        stamp = (str(path), str(pipe.device), path.stat().st_mtime)
        if stamp not in self._controlnets:
            net = read_controlnet(path, device=pipe.device, dtype=pipe.dtype)
            check_fits(net, pipe.denoiser, f"ControlNet {key}")
            if net.factor != pipe.factor:
                raise UserError(f"ControlNet {key} downsamples control images {net.factor}x, the model's "
                                f"autoencoder {pipe.factor}x: it was made for another base model")
            self._controlnets[stamp] = net
        return self._controlnets[stamp]


def _files(folder: Path | None, suffixes: tuple, recursive: bool = True) -> dict[str, Path]:
    if folder is None or not folder.is_dir():
        return {}
    found = folder.rglob("*") if recursive else folder.glob("*")
    return {p.stem: p for p in sorted(found) if p.is_file() and p.suffix.lower() in suffixes}
