"""`Pipeline`: a loaded latent diffusion model with one method per generation task, and `load`.

    from ldmkit import pipelines
    pipe = pipelines.load("path/to/model")            # ours, a diffusers folder or a single file
    images = pipe.text2img("a red circle", num=4, seed=1, steps=20, guidance=7.5)

The shared wiring is `base.PipelineCore`; each task module (text2img, img2img, inpaint, upscale,
semantic) says what the latents start from and what the denoiser sees concatenated to them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldmkit.io import load_model, resolve_model_path, sampling_settings
from ldmkit.io.diffusers_format import controlnet_folders
from ldmkit.pipelines.base import PipelineCore, Result
from ldmkit.pipelines.img2img import img2img
from ldmkit.pipelines.inpaint import inpaint
from ldmkit.pipelines.semantic import semantic2img
from ldmkit.pipelines.text2img import text2img
from ldmkit.pipelines.upscale import upscale
from ldmkit.util import file_sha256, parse_dtype


class Pipeline(PipelineCore):
    """Build it with `load(path)` or directly from modules (`PipelineCore`'s arguments)."""

    model_path: Path | None = None  # the folder or file `load` read

    def text2img(self, prompt=None, **kw) -> list[Result]:
        return text2img(self, prompt, **kw)

    def img2img(self, image, prompt=None, **kw) -> list[Result]:
        return img2img(self, image, prompt, **kw)

    def inpaint(self, image, mask, prompt=None, **kw) -> list[Result]:
        return inpaint(self, image, mask, prompt, **kw)

    def upscale(self, image, prompt=None, **kw) -> list[Result]:
        return upscale(self, image, prompt, **kw)

    def semantic2img(self, seg_map, prompt=None, **kw) -> list[Result]:
        return semantic2img(self, seg_map, prompt, **kw)

    # ---- adapters ---------------------------------------------------------------------------
    def load_tiny_decoder(self, path) -> None:
        """A tiny decoder for fast decoding and previews (`autoencoder.tiny.read_tiny_decoder`: ldmkit,
        diffusers AutoencoderTiny, TAESD files); it must decode this model's latents."""
        from ldmkit.io.tiny_decoder_files import read_tiny_decoder
        from ldmkit.errors import UserError

        tiny = read_tiny_decoder(path)
        if (tiny.config.latent_channels, tiny.downsample_factor) != (self.latent_channels, self.factor):
            raise UserError(f"--tiny-decoder {path}: it decodes {tiny.config.latent_channels}-channel latents "
                            f"{tiny.downsample_factor}x; this model's are {self.latent_channels}-channel, "
                            f"{self.factor}x")
        out = getattr(self.autoencoder.config, "out_channels", tiny.config.out_channels)
        if tiny.config.out_channels != out:
            raise UserError(f"--tiny-decoder {path}: it makes {tiny.config.out_channels}-channel images; this model's "
                            f"autoencoder makes {out}-channel ones")
        self.tiny_decoder = tiny.to(self.device, self.dtype)

    def load_lora(self, path, scale: float = 1.0) -> int:
        """Merge a LoRA file (kohya / A1111, diffusers / peft; detected from its keys) into the weights
        at `scale` (repeat for several); returns the number of layers it changed."""
        from ldmkit.adapters.lora import merge
        from ldmkit.io.adapter_files import read_lora

        lora = read_lora(path)
        n = merge({"denoiser": self.denoiser, "conditioner": self.conditioner}, lora, scale, str(path))
        if hasattr(self.conditioner, "_cache"):  # frozen text encoders cache prompts: their weights changed
            self.conditioner._cache = {}
        self.adapters.append({"kind": "lora", "name": Path(path).stem, "scale": scale,
                              "hash": file_sha256(path)[:12]})
        return n

    def load_embedding(self, path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (diffusers or A1111 file); the trigger token is `token`, else
        the file's own (diffusers), else the file name (A1111). Returns the tokenizer entries added."""
        from ldmkit.adapters.embeddings import add_token
        from ldmkit.io.adapter_files import read_embedding

        stored, vectors = read_embedding(path)
        token = token or stored or Path(path).stem
        names = add_token(self.conditioner, token, vectors, source=str(path))
        self.adapters.append({"kind": "embedding", "name": token, "hash": file_sha256(path)[:12]})
        return names

    def load_controlnet(self, path, scale: float = 1.0, start: float = 0.0, end: float = 1.0):
        """Attach a ControlNet (a diffusers ControlNetModel folder, a ControlNet pipeline's controlnet/, or an
        original single file)
        at `scale`, active from fraction `start` to `end` of the steps; repeat for several (their control
        images are then given in the same order). Returns the ControlNet."""
        from ldmkit.io.controlnet_files import check_fits, controlnet_folder, read_controlnet
        from ldmkit.pipelines.control import Attached, check_settings

        where = f"--controlnet {path}"
        check_settings(float(scale), float(start), float(end), where)
        net = read_controlnet(path, device=self.device, dtype=self.dtype)
        check_fits(net, self.denoiser, where)
        if Path(path).is_file():  # an original single file
            weights, name = [Path(path)], Path(path).stem
        else:
            folder, name = controlnet_folder(path), Path(path).name
            weights = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) or sorted(folder.glob("*.bin"))
        self.controlnets.append(Attached(net, name, float(scale), float(start), float(end),
                                         file_sha256(weights[0])[:10] if weights else ""))
        return net

    def load_refiner(self, path, start: float = 0.8, **options) -> "Pipeline":
        """SDXL's ensemble of experts: from fraction `start` of the noise levels on (diffusers'
        `denoising_end` / `denoising_start`), the refiner `path` (an SDXL refiner, or any model with this
        one's schedule and latents) denoises the base's latents. Returns the refiner's pipeline."""
        from ldmkit.errors import UserError

        if not 0.0 < float(start) < 1.0:
            raise UserError(f"--refiner-start {start}: the refiner takes over at a fraction of the noise levels in "
                            "(0, 1)")
        refiner = load(path, device=self.device, dtype=self.dtype, **options)
        if refiner.schedule.to_dict() != self.schedule.to_dict():
            raise UserError(f"--refiner {path}: its noise schedule differs from the base model's; the refiner must "
                            "continue the base's noise levels")
        if (refiner.latent_channels, refiner.factor) != (self.latent_channels, self.factor) or \
                "text2img" not in refiner.tasks or refiner.conditioning != self.conditioning:
            raise UserError(f"--refiner {path}: a refiner continues the base's latents; it must take "
                            f"{self.latent_channels}-channel latents at factor {self.factor} and "
                            f"{self.conditioning} conditioning, as the base does")
        self.refiner = (refiner, float(start))
        return refiner

    def load_ip_adapter(self, path, scale: float = 1.0, image_encoder=None):
        """Attach an IP-Adapter (h94's single file, .safetensors or .bin: the basic one or Plus) at `scale`,
        with its CLIP image encoder: `image_encoder` (a CLIPVisionModelWithProjection folder), else
        image_encoder/ beside the file, else the model folder's. The image prompt is then given to
        text2img / img2img / inpaint (`image_prompt=`). Returns the adapter (`adapters.ip_adapter.IPAdapter`)."""
        from ldmkit.adapters.ip_adapter import attach
        from ldmkit.errors import UserError
        from ldmkit.io import ip_adapter_files as files
        from ldmkit.pipelines.image_prompt import Attached, check_scale

        where = f"--ip-adapter {path}"
        scale = check_scale(scale, where)
        if self.ip_adapter is not None:
            raise UserError(f"{where}: IP-Adapter {self.ip_adapter.name} is already loaded; ldmkit runs one at a time")
        if self.conditioning != "text":
            raise UserError(f"{where}: IP-Adapters need a text-conditioned UNet; this model's conditioning is "
                            f"{self.conditioning!r}")
        adapter = files.read_ip_adapter(path, dtype=self.dtype)
        unet = files.check_fits(adapter, self.denoiser, where)
        folder = files.image_encoder_folder(image_encoder, path, self.model_path)
        encoder, processor = files.read_image_encoder(folder, self.model_path, self.device, self.dtype)
        files.check_encoder_fits(adapter, encoder, where)
        self.model_hash  # noqa: B018 -- the model's own hash, before the adapter's layers join the denoiser
        adapter.set_scale(scale)
        attach(unet, adapter.to(self.device))
        self.ip_adapter = Attached(adapter, encoder, processor, Path(path).stem, file_sha256(path)[:10])
        return adapter

    def unload_ip_adapter(self) -> None:
        """Remove the IP-Adapter: the UNet's cross-attention is its own again."""
        from ldmkit.adapters.ip_adapter import detach

        if self.ip_adapter is not None:
            detach(getattr(self.denoiser, "unet", self.denoiser))
            self.ip_adapter = None


def denoiser_weights_file(path: Path) -> Path | None:
    """The file holding the denoiser's weights in any of the model formats we load."""
    if path.is_file():
        return path
    for cand in [path / "denoiser" / "model.safetensors", path / "unet" / "diffusion_pytorch_model.safetensors",
                 *sorted((path / "unet").glob("*.safetensors")),
                 *sorted((path / "unet").glob("*.bin")), *sorted((path / "transformer").glob("*.safetensors"))]:
        if cand.is_file():
            return cand
    return None


def load(path, device=None, dtype=None, **options) -> Pipeline:
    """Load a model folder (ours, diffusers' or an original single file) as a ready `Pipeline`.

    device: None = CUDA when available, else CPU. dtype: None = float16 on CUDA, float32 on CPU.
    options go to the foreign-format importers (e.g. variant="fp16", upcast_vae, clip_skip).
    """
    try:
        device = torch.device(device) if device is not None else None
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps") from None
    device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available (torch sees no CUDA GPU); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} is not available; use --device cpu")
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    p = resolve_model_path(path)
    index, comps = load_model(p, device=device, dtype=dtype, **options)
    for name in ("autoencoder", "denoiser"):
        if comps.get(name) is None:
            raise FileNotFoundError(f"model {p} has no {name} component (expected {p / name}/)")
    if not index.get("schedule"):
        raise ValueError(f"{p}: model_index.json has no 'schedule'")
    how = sampling_settings(index, comps)
    weights = denoiser_weights_file(p)
    model_hash = file_sha256(weights)[:10] if weights is not None else None
    pipe = Pipeline(comps["autoencoder"], comps["denoiser"], how["schedule"], comps.get("conditioner"),
                    prediction=how["objective"], conditioning=how["conditioning"], concat=how["concat"],
                    defaults=index.get("defaults"), latent_size=how["latent_size"], model_hash=model_hash,
                    model_name=p.name, spatial=comps.get("spatial"))
    pipe.model_path = p  # an IP-Adapter's image encoder may sit in its image_encoder/
    pipe.tiny_decoder = comps.get("tiny_decoder")  # fast decoding and previews (`ldm train-tiny-decoder`)
    for folder in controlnet_folders(p):  # a diffusers ControlNet pipeline brings its ControlNets
        pipe.load_controlnet(folder)
    return pipe
