"""Black Forest Labs' single-file FLUX.1 transformers (`flux1-dev.safetensors`, `flux1-schnell.safetensors`;
with or without a `model.diffusion_model.` prefix) -> an ldmkit model, next to `io.flux_format` (diffusers
folders), whose building code it shares. The file holds the transformer only: its VAE, text encoders,
tokenizers and scheduler come from `base=FOLDER`, a diffusers FLUX.1 folder.

Names, BFL -> diffusers (= ldmkit):

    img_in, txt_in                      x_embedder, context_embedder
    time_in / vector_in / guidance_in   time_text_embed.{timestep,text,guidance}_embedder; in_layer / out_layer
                                        -> linear_1 / linear_2 (guidance_in: FLUX.1-dev only)
    double_blocks.N.                    transformer_blocks.N.
        img_mod.lin / txt_mod.lin       norm1.linear / norm1_context.linear
        img_attn.qkv / txt_attn.qkv     attn.to_{q,k,v} / attn.add_{q,k,v}_proj   (rows split in three)
        img_attn.norm.query_norm.scale  attn.norm_q.weight (key_norm: norm_k; txt_attn: norm_added_{q,k})
        img_attn.proj / txt_attn.proj   attn.to_out.0 / attn.to_add_out
        img_mlp.{0,2} / txt_mlp.{0,2}   ff.net.{0.proj,2} / ff_context.net.{0.proj,2}
    single_blocks.N.                    single_transformer_blocks.N.
        linear1                         attn.to_{q,k,v} and proj_mlp   (rows split: D, D, D, 4 D)
        linear2                         proj_out
        norm.{query,key}_norm.scale     attn.norm_{q,k}.weight
        modulation.lin                  norm.linear
    final_layer.linear                  proj_out
    final_layer.adaLN_modulation.1      norm_out.linear (BFL's (shift, scale) halves swap to diffusers' (scale, shift))

The rotary split of the heads is not in the file: FLUX.1's (16, 56, 56) for 128-wide heads, else base's
transformer/config.json.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

PREFIX = "model.diffusion_model."
MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
FLUX_ROPE = {128: (16, 56, 56)}  # head width -> axes_dims_rope of FLUX.1
FLUX_SCHEDULERS = {  # the schedulers of the FLUX.1-dev and -schnell releases, when base is of the other kind
    True: {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
           "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
           "max_image_seq_len": 4096},
    False: {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0},
}
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear"}
_EMBEDDERS = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_attn.proj": "attn.to_out.0",
           "txt_attn.proj": "attn.to_add_out", "img_attn.norm.query_norm": "attn.norm_q",
           "img_attn.norm.key_norm": "attn.norm_k", "txt_attn.norm.query_norm": "attn.norm_added_q",
           "txt_attn.norm.key_norm": "attn.norm_added_k", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"linear2": "proj_out", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
           "modulation.lin": "norm.linear"}
_KEY = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)")


def is_flux_file(state: dict) -> bool:
    return MARKER in state or PREFIX + MARKER in state


def transformer_tensors(state: dict) -> tuple[dict, list]:
    """The transformer's tensors (BFL names, prefix stripped) and the names of the others (ignored)."""
    if PREFIX + MARKER in state:
        return ({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)},
                sorted(k for k in state if not k.startswith(PREFIX)))
    return dict(state), []


def flux_to_diffusers(state: dict) -> tuple[dict, dict]:
    """FLUX.1 transformer tensors in BFL's names -> (FluxConfig fields but axes_dims_rope, diffusers' names).
    Split rows are copied into storage of their own: on a view's offset CPU kernels may round differently."""
    from ldmkit.errors import UserError
    from ldmkit.io.sd3_single_file import swap_halves

    for k in ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"):
        if k not in state:
            raise UserError(f"not a FLUX.1 transformer: {k} is missing")
    width = state["img_in.weight"].shape[0]
    out, unused = {}, []
    for k, v in state.items():
        m = _KEY.fullmatch(k)
        name, _, kind = k.rpartition(".")
        if m is None:
            head, _, rest = name.partition(".")
            if name in _TOP:
                out[f"{_TOP[name]}.{kind}"] = swap_halves(v) if name == "final_layer.adaLN_modulation.1" else v
            elif head in _EMBEDDERS and rest in ("in_layer", "out_layer"):
                out[f"time_text_embed.{_EMBEDDERS[head]}.linear_{1 if rest == 'in_layer' else 2}.{kind}"] = v
            else:
                unused.append(k)
            continue
        blocks, i, name, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        kind = "weight" if kind == "scale" else kind  # QKNorm's RMSNorm scale -> RMSNorm weight
        if blocks == "double_blocks":
            base = f"transformer_blocks.{i}."
            if name in _DOUBLE_QKV:
                for new, part in zip(_DOUBLE_QKV[name], v.chunk(3, dim=0)):
                    out[f"{base}{new}.{kind}"] = part.clone()
            elif name in _DOUBLE:
                out[f"{base}{_DOUBLE[name]}.{kind}"] = v
            else:
                unused.append(k)
            continue
        base = f"single_transformer_blocks.{i}."
        if name == "linear1":
            if v.shape[0] != 7 * width:
                raise UserError(f"{k} has {v.shape[0]} rows: not q, k, v and an MLP 4x as wide ({7 * width})")
            for new, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                                 v.split((width, width, width, 4 * width), dim=0)):
                out[f"{base}{new}.{kind}"] = part.clone()
        elif name in _SINGLE:
            out[f"{base}{_SINGLE[name]}.{kind}"] = v
        else:
            unused.append(k)
    if unused:
        raise UserError(f"FLUX.1 transformer tensors with no ldmkit counterpart: {sorted(unused)[:6]}")
    return _flux_config(state, width), out


def _flux_config(state: dict, width: int) -> dict:
    from ldmkit.io.ldm_layout import _indices

    head = state[MARKER].shape[0]
    return {"patch_size": 1, "in_channels": state["img_in.weight"].shape[1],
            "out_channels": state["final_layer.linear.weight"].shape[0],
            "num_layers": len(_indices(state, "double_blocks.")),
            "num_single_layers": len(_indices(state, "single_blocks.")), "attention_head_dim": head,
            "num_attention_heads": width // head, "joint_attention_dim": state["txt_in.weight"].shape[1],
            "pooled_projection_dim": state["vector_in.in_layer.weight"].shape[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in state}


def load_flux_single_file(path, state: dict, device=None, dtype: torch.dtype | None = None, base=None,
                          max_sequence_length: int = 512, variant: str | None = None):
    """(index, components) of a FLUX.1 single file (read into `state`) completed by the diffusers FLUX folder
    `base` (see the module docstring)."""
    from ldmkit.denoisers.flux import FluxConfig
    from ldmkit.errors import UserError
    from ldmkit.io.files import read_json
    from ldmkit.io.flux_format import flux_base_parts, flux_model, is_flux
    from ldmkit.io.sd3_format import check_folder, flow_schedule_from_diffusers

    name = Path(path).name
    if base is None:
        raise UserError(f"{name} holds FLUX.1's transformer only: pass base=FOLDER (CLI: --base FOLDER), a diffusers "
                        "FLUX.1 folder, for its VAE, text encoders, tokenizers and scheduler")
    root = Path(base).expanduser()
    if not root.is_dir() or not is_flux(root):
        raise UserError(f"base={base}: not a diffusers FLUX.1 folder (a model_index.json naming FluxPipeline); "
                        f"{name} takes its VAE, text encoders, tokenizers and scheduler from one")
    check_folder(root, "FLUX", ("vae", "text_encoder", "text_encoder_2", "scheduler"))
    tensors, ignored = transformer_tensors(state)
    fields, net = flux_to_diffusers(tensors)
    if fields["in_channels"] != fields["out_channels"]:
        raise UserError(f"{name}: a transformer taking {fields['in_channels']} channels for "
                        f"{fields['out_channels']} out (FLUX.1 Fill / Depth) is not supported")
    base_cfg = read_json(root / "transformer" / "config.json") if (root / "transformer" / "config.json").is_file() \
        else {}
    rope = FLUX_ROPE.get(fields["attention_head_dim"])
    if rope is None and base_cfg.get("attention_head_dim") == fields["attention_head_dim"]:
        rope = base_cfg.get("axes_dims_rope")
    if rope is None:
        raise UserError(f"{name}: heads {fields['attention_head_dim']} wide, not FLUX.1's 128, and base={base} has no "
                        "transformer/config.json with heads as wide: their rotary split (axes_dims_rope) is unknown")
    try:
        cfg = FluxConfig.from_dict({**fields, "axes_dims_rope": list(rope)})
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name}: {exc}") from None
    dev = cfg.guidance_embeds
    notes = [f"{name}: Black Forest Labs FLUX.1 transformer ({'dev: distilled guidance' if dev else 'no guidance'}, "
             f"{cfg.num_layers} double + {cfg.num_single_layers} single blocks); the rest from {root}"]
    if ignored:
        notes.append(f"ignored {len(ignored)} tensors outside the transformer: {ignored[:4]}")
    ae, clip, t5, scheduling = flux_base_parts(root, variant, dtype)
    if base_cfg and bool(base_cfg.get("guidance_embeds", False)) != dev:  # e.g. a dev file on a schnell folder
        schedule, sampler = flow_schedule_from_diffusers(FLUX_SCHEDULERS[dev], "FLUX.1's scheduler")
        scheduling = ({**schedule, "grid": "flux"}, sampler)
        notes.append(f"{'FLUX.1-dev' if dev else 'FLUX.1-schnell'}'s scheduler (base is the other kind)")
    return flux_model(cfg, net, ae, clip, t5, scheduling, notes, device=device, dtype=dtype,
                      max_sequence_length=max_sequence_length)


__all__ = ["flux_to_diffusers", "is_flux_file", "load_flux_single_file", "transformer_tensors"]
