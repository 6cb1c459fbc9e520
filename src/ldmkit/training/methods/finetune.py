"""Method "finetune": adapt a pretrained model (`--init-from MODEL`) to a subject or a style.

    what trains                      flags                                   output in the run folder
    the whole denoiser (+ text enc.) (default)                               model/ (a model folder)
    LoRA layers only                 --lora-rank R [--lora-targets ...]      pytorch_lora_weights.safetensors
                                                                             (--lora-format kohya: RUN_NAME.safetensors)
    new token vectors only           --textual-inversion --token T           learned_embeds.safetensors + T.safetensors
    + DreamBooth prior preservation  --instance-data DIR --instance-prompt P --class-prompt C [--prior-loss-weight W]

DreamBooth (Ruiz et al. 2023): every step's batch holds instance images (captioned with the instance
prompt, e.g. "a photo of sks dog") and as many class images (the class prompt, "a photo of a dog"),
which the model itself generates before training when --class-data holds fewer than
--num-class-images; the loss is mean(instance) + W * mean(class), so the model learns the subject
without forgetting the class. Textual inversion (Gal et al. 2022) learns only the vectors of a new
token, from captions made of templates ("a photo of a {token}"). LoRA (Hu et al. 2021) trains
low-rank updates of the chosen layers through peft; it combines with DreamBooth.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import UserError
from ldmkit.training.config import option
from ldmkit.training.methods.ldm import LDM, LDMConfig
from ldmkit.training.methods.ldm_parts import Stage2

# textual-inversion captions: the token as an object or as a style ({} = the token)
TEMPLATES = {
    "object": ("a photo of a {}", "a photo of the {}", "a close-up photo of a {}", "a cropped photo of the {}",
               "a bright photo of a {}", "a dark photo of the {}", "a good photo of a {}", "a rendition of the {}",
               "a photo of a small {}", "a photo of a large {}", "a picture of one {}", "an image of the {}"),
    "style": ("a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
              "a drawing in the style of {}", "an image in the style of {}", "a cropped painting in the style of {}",
              "a small painting in the style of {}", "a large picture in the style of {}"),
}


@dataclass(frozen=True)
class FineTuneConfig(LDMConfig):
    # fine-tuning defaults: small batches, no EMA, no warm-up, a constant rate, no condition dropout
    steps: int = option(500, "optimiser steps in all (a resumed run continues to this)", lo=1, resume=True)
    batch_size: int = option(4, "global batch per optimiser step (with --class-prompt: half instance, half class "
                             "images)", lo=1)
    lr_schedule: str = option("constant", "after warm-up: constant, or cosine to 0 at the last step",
                              choices=("constant", "cosine"))
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", lo=0)
    ema_decay: float = option(0.0, "EMA decay of the trained weights, which are exported (0 disables the EMA)",
                              lo=0, hi=0.999999)
    cond_drop: float = option(0.0, "probability that a sample's condition is dropped (classifier-free guidance)",
                              lo=0, hi=0.99)
    checkpoint_every: int = option(250, "steps between checkpoints (one is always written at the end)", lo=1,
                                   resume=True)
    sample_every: int = option(250, "steps between sample grids (one is always made at the end)", lo=1, resume=True)
    lora_rank: int = option(0, "train a LoRA of this rank instead of the weights (0: no LoRA)", lo=0, hi=1024)
    lora_alpha: float | None = option(None, "LoRA alpha: the update is scaled by alpha / rank (default: the rank)",
                                      lo=0, lo_open=True)
    lora_targets: tuple[str, ...] = option(("attn",), "layers that get a LoRA: attn (to_q/k/v/out), ff, proj, conv "
                                           "(resnets: LoCon), text (the text encoder's attention), text-mlp, or "
                                           "module-name suffixes")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input", lo=0, hi=0.9)
    lora_format: str = option("diffusers", "LoRA file: diffusers (pytorch_lora_weights.safetensors, peft names) or "
                              "kohya (lora_unet_* / lora_te_*, read by AUTOMATIC1111 and ComfyUI)",
                              choices=("diffusers", "kohya"), resume=True)
    instance_data: str = option("", "DreamBooth / textual inversion: the folder of subject images")
    instance_prompt: str = option("", "caption of every instance image (default: their own captions)")
    class_data: str = option("", "DreamBooth: folder of class images (filled up to --num-class-images by the model "
                             "itself; default: RUN/class_images)")
    class_prompt: str = option("", "DreamBooth: caption of the class images; turns prior preservation on")
    num_class_images: int = option(100, "DreamBooth: class images wanted in --class-data", lo=1, hi=100000)
    prior_loss_weight: float = option(1.0, "DreamBooth: weight of the class images' loss", lo=0)
    textual_inversion: bool = option(False, "learn only new token vectors (--token, --init-word)")
    token: str = option("", "textual inversion: the new token, e.g. <cat-toy>")
    init_word: str = option("", "textual inversion: start the token's vectors from this word's embedding")
    num_vectors: int = option(1, "textual inversion: vectors of the token", lo=1, hi=64)
    learnable_property: str = option("object", "textual inversion: caption templates of an object or a style",
                                     choices=("object", "style"))

    def validate(self) -> None:
        super().validate()
        if not self.fine_tunes:
            got = f" ({self.init_from} is a .pt file, read as a training checkpoint)" if self.init_from else ""
            raise UserError("finetune adapts a pretrained model: give --init-from MODEL (an ldmkit or diffusers "
                            f"folder, an original single file, or a bundled model name){got}")
        if self.textual_inversion:
            if not self.token or not self.init_word:
                raise UserError("--textual-inversion needs --token (the new word) and --init-word (where it starts)")
            if self.lora_rank or self.class_prompt:
                raise UserError("--textual-inversion trains token vectors only; it does not combine with --lora-rank "
                                "or --class-prompt")
            if self.train_text_encoder:
                raise UserError("--textual-inversion keeps the text encoder frozen; drop --train-text-encoder")
        if self.class_prompt:
            if not self.instance_data:
                raise UserError("--class-prompt (prior preservation) needs --instance-data")
            if self.batch_size % 2:
                raise UserError(f"batch_size {self.batch_size}: with --class-prompt half of each batch are class "
                                "images, so it must be even")
        if (self.instance_prompt or self.class_data) and not self.instance_data:
            raise UserError("--instance-prompt and --class-data describe --instance-data; give --instance-data DIR")
        sources = [n for n in ("instance_data", "data", "latents") if getattr(self, n)]
        if len(sources) != 1:
            raise UserError("training data: give one of --instance-data, --data or --latents"
                            + (f" (got {', '.join('--' + n.replace('_', '-') for n in sources)})" if sources else ""))
        if self.lora_rank and self.train_text_encoder:
            raise UserError("with --lora-rank the text encoder trains through LoRA layers: add 'text' to "
                            "--lora-targets instead of --train-text-encoder")


class FineTune(LDM):
    name = "finetune"
    summary = ("fine-tune a pretrained model (--init-from MODEL): the whole denoiser, a LoRA (--lora-rank), new token "
               "vectors (--textual-inversion) or DreamBooth with prior preservation (--class-prompt).")
    route_flags = ("lora_rank", "instance_data", "textual_inversion", "class_prompt")  # they pick this method

    @property
    def outputs(self) -> tuple:
        c = self.config
        if c.textual_inversion:
            return ("learned_embeds.safetensors", f"{embedding_name(c.token)}.safetensors")
        if c.lora_rank:
            return (lora_file_name(c),)
        return ("model",)

    # ---- data ---------------------------------------------------------------------------------
    def open_data(self, source):
        c = self.config
        folder = c.instance_data or (c.data if c.textual_inversion else "")  # TI captions come from templates
        if not folder:
            return super().open_data(source)
        from ldmkit.data.image_data import ImageData
        from ldmkit.training.methods import ldm_parts as parts

        if source["conditioning"] != "text":
            raise UserError(f"--instance-data: {c.init_from} is a {source['conditioning']!r}-conditioned model; "
                            "DreamBooth and textual inversion need a text-conditioned one")
        size = c.resolution or parts.default_resolution(source, self.autoencoder)
        caption = c.instance_prompt or (c.token if c.textual_inversion else None)
        what = "--instance-data" if c.instance_data else "--data"
        data = ImageData.from_folder(folder, size, caption=caption, random_crop=c.random_crop, flip=c.random_flip,
                                     what=what)
        self.num_instance = len(data)
        if c.class_prompt:
            folder = Path(c.class_data or Path(c.out) / "class_images")
            if self.ctx.is_main:
                make_class_images(self, source, folder, size)
            self.ctx.barrier()
            data = data.plus(folder, c.class_prompt, random_crop=c.random_crop, flip=c.random_flip,
                             what="--class-data")
        data.bind(self.autoencoder)
        return data, f"{what} {folder}"

    def step_items(self, step: int) -> list[int]:
        """Prior preservation: instance and class images alternate in the batch, each cycling through
        its own sequence of permutations (an epoch = one pass over the instance images)."""
        c = self.config
        if not c.class_prompt:
            return super().step_items(step)
        half, n_inst = c.batch_size // 2, self.num_instance
        n_class = len(self.data) - n_inst
        inst = _stream(n_inst, c.seed, step * half, half)
        cls = _stream(n_class, c.seed + 7777, step * half, half)
        return [i for pair in zip(inst, (n_inst + j for j in cls)) for i in pair]

    def row_weights(self, idx: list[int]) -> torch.Tensor | None:
        """mean over instance rows + W x mean over class rows, as a mean over all rows: 2 and 2W."""
        c = self.config
        if not c.class_prompt:
            return None
        return torch.tensor([2.0 if i < self.num_instance else 2.0 * c.prior_loss_weight for i in idx],
                            device=self.device)

    def draw(self, step: int) -> dict:
        out = super().draw(step)
        if self.config.textual_inversion:  # from their own generator: the other draws stay as in ldm
            g = torch.Generator().manual_seed((self.config.seed * 1_000_033 + step * 104729 + 99) % (2**63 - 1))
            out["template"] = torch.randint(0, len(TEMPLATES[self.config.learnable_property]),
                                            (self.config.batch_size,), generator=g)
        return out

    def conditions_of(self, idx, rows, draws, step):
        c = self.config
        if not c.textual_inversion:
            return super().conditions_of(idx, rows, draws, step)
        templates = TEMPLATES[c.learnable_property]
        return [templates[int(k)].format(c.token) for k in draws["template"][rows]]

    # ---- what trains ------------------------------------------------------------------------
    def adapt(self, model: Stage2) -> Stage2:
        c = self.config
        if not (c.lora_rank or c.textual_inversion):
            return super().adapt(model)
        model.requires_grad_(False)
        if c.textual_inversion:
            from ldmkit.adapters.embeddings import add_token, init_vectors

            vectors = init_vectors(model.conditioner, c.init_word, c.num_vectors)
            add_token(model.conditioner, c.token, vectors, trainable=True, source="--token")
        else:
            self.lora_paths = attach_lora(model, c)
        if c.gradient_checkpointing:
            from ldmkit.training.methods.ldm_parts import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        return model

    def param_groups(self, model: nn.Module) -> dict[str, list[dict]]:
        if self.config.textual_inversion:  # the vectors are embeddings: no weight decay
            return {"main": [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]}
        return super().param_groups(model)

    def sample_prompts(self) -> list:
        c = self.config
        if c.sample_prompts:
            return list(c.sample_prompts)
        if c.textual_inversion:
            return [TEMPLATES[c.learnable_property][0].format(c.token)]
        if c.instance_prompt:
            return [c.instance_prompt] + ([c.class_prompt] if c.class_prompt else [])
        return super().sample_prompts()

    def describe(self) -> dict:
        out = super().describe()
        out["trained_parameters"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return out

    # ---- outputs ----------------------------------------------------------------------------
    def usage(self, result: Path) -> str:
        c = self.config
        if c.textual_inversion:
            return (f"embedding written to {result} and {result.parent / self.outputs[1]} (use it with: ldm sample "
                    f"--model {c.init_from} --embedding {result} --prompt \"... {c.token} ...\")")
        if c.lora_rank:
            return f"LoRA written to {result} (use it with: ldm sample --model {c.init_from} --lora {result} ...)"
        return super().usage(result)

    def export(self, model: Stage2, out: Path) -> Path:
        c = self.config
        if c.textual_inversion:
            from ldmkit.adapters.embeddings import learned_vectors
            from ldmkit.io.adapter_files import write_embedding

            vectors = learned_vectors(model.conditioner, c.token)
            meta = {"ldmkit_base_model": str(c.init_from), "ldmkit_steps": str(c.steps)}
            write_embedding(out / f"{embedding_name(c.token)}.safetensors", c.token, vectors, "a1111", meta)
            return write_embedding(out / "learned_embeds.safetensors", c.token, vectors, "diffusers", meta)
        if c.lora_rank:
            from ldmkit.io.adapter_files import write_lora

            lora = extract_lora(model)
            return write_lora(out / lora_file_name(c), lora, c.lora_format, lora_metadata(self, lora))
        return super().export(model, out)


# ----------------------------------------------------------------------------------------- pieces
def _stream(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions start ... start + count - 1 of an endless sequence of permutations of range(n)
    (permutation e seeded by (seed, e))."""
    out = []
    for pos in range(start, start + count):
        epoch, k = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perm[k]))
    return out


def lora_root(denoiser: nn.Module) -> nn.Module:
    """The plain UNet / DiT whose paths a LoRA file names (an extended UNet's `.unet`)."""
    inner = getattr(denoiser, "unet", None)
    return inner if isinstance(inner, nn.Module) else denoiser


def attach_lora(model: Stage2, c: FineTuneConfig) -> dict[str, list[str]]:
    from ldmkit.adapters.lora import attach, target_suffixes

    targets = target_suffixes(c.lora_targets)
    paths = {}
    if targets["unet"]:
        paths["unet"] = attach(lora_root(model.denoiser), c.lora_rank, c.lora_alpha, targets["unet"], c.lora_dropout)
    if targets["text_encoder"]:
        text = getattr(model.conditioner, "model", None)
        if text is None:
            raise UserError(f"--lora-targets {', '.join(c.lora_targets)}: this model's conditioner "
                            f"({type(model.conditioner).__name__}) is not a transformers text encoder")
        paths["text_encoder"] = attach(text, c.lora_rank, c.lora_alpha, targets["text_encoder"], c.lora_dropout,
                                       what="the text encoder")
    return paths


def extract_lora(model: Stage2):
    from ldmkit.adapters.lora import LoRA, extract

    lora = LoRA()
    unet = extract(lora_root(model.denoiser))
    if unet:
        lora.layers["unet"] = unet
    text = getattr(model.conditioner, "model", None)
    if text is not None and extract(text):
        lora.layers["text_encoder"] = extract(text)
    return lora


def lora_file_name(c: FineTuneConfig) -> str:
    from ldmkit.io.adapter_files import DIFFUSERS_LORA_FILE

    return DIFFUSERS_LORA_FILE if c.lora_format == "diffusers" else f"{Path(c.out).name or 'lora'}.safetensors"


def embedding_name(token: str) -> str:
    """A file name for the A1111 embedding (A1111's trigger word is the file name): the token without
    characters file systems refuse."""
    name = "".join(ch for ch in token if ch.isalnum() or ch in "-_.").strip(".")
    return name or "embedding"


def lora_metadata(method: FineTune, lora) -> dict[str, str]:
    from ldmkit.io.adapter_files import kohya_metadata

    c = method.config
    base = Path(str(c.init_from)).name
    settings = {"name": Path(c.out).name, "ss_learning_rate": c.lr, "ss_steps": c.steps, "ss_max_train_steps": c.steps,
                "ss_batch_size_per_device": c.batch_size // max(1, method.ctx.world_size),
                "ss_resolution": f"({method.data.latent_shape[1] * method.autoencoder.downsample_factor}, "
                                 f"{method.data.latent_shape[2] * method.autoencoder.downsample_factor})",
                "ss_num_train_images": getattr(method, "num_instance", len(method.data)), "ss_seed": c.seed, "ss_lr_scheduler": c.lr_schedule,
                "ss_mixed_precision": c.precision, "ss_network_dropout": c.lora_dropout,
                "ss_base_model_version": _base_version(method)}
    meta = kohya_metadata(lora, base, settings) if c.lora_format == "kohya" else {}
    meta.update({"ldmkit_base_model": base, "ldmkit_rank": str(c.lora_rank),
                 "ldmkit_alpha": str(c.lora_alpha if c.lora_alpha is not None else c.lora_rank),
                 "ldmkit_targets": ",".join(c.lora_targets)})
    return meta


def _base_version(method: FineTune) -> str:
    """kohya's ss_base_model_version of the fine-tuned model (SD 1.x: 768-wide context; SD 2.x: 1024; SDXL: 2048)."""
    width = getattr(method.model.denoiser.config, "cross_attention_dim", None)
    v = method.objective == "v"
    return {768: "sd_v1", 1024: "sd_v2_768_v" if v else "sd_v2_512", 2048: "sdxl_base_v1-0"}.get(width, "ldmkit")


@torch.no_grad()
def make_class_images(method: FineTune, source: dict, folder: Path, size: int) -> None:
    """DreamBooth's class images: fill `folder` up to --num-class-images with images the pretrained
    model makes from --class-prompt (numbered after those there; seeds seed + k)."""
    from ldmkit.data.images import IMAGE_EXTENSIONS
    from ldmkit.io.images import save_png
    from ldmkit.pipelines import Pipeline

    c = method.config
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    missing = c.num_class_images - len(have)
    if missing <= 0:
        return
    f = source["autoencoder"].downsample_factor
    pipe = Pipeline(source["autoencoder"], source["denoiser"], source["schedule"], source["conditioner"],
                    prediction=source["objective"], conditioning="text", latent_size=[size // f, size // f])
    pipe.to(method.device)
    print(f"finetune: generating {missing} class images of {c.class_prompt!r} into {folder}")
    results = pipe.text2img(c.class_prompt, num=missing, seed=c.seed + len(have), batch_size=4,
                            sampler=method.sampler, steps=c.sample_steps, guidance=c.guidance, height=size, width=size,
                            progress=c.progress)
    for k, r in enumerate(results):
        save_png(r.image, folder / f"class-{len(have) + k:05d}.png", r.metadata)


__all__ = ["FineTune", "FineTuneConfig", "TEMPLATES"]
