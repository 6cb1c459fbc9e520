"""Tensor renaming of the original CompVis / LDM / OpenCLIP layouts to diffusers' (= ldmkit's) names and
the architecture inferred from tensor shapes: the UNet (`unet_to_diffusers`), the KL autoencoder
(`vae_to_diffusers`) and the text encoders (`clip_to_transformers`, `openclip_to_transformers`). The
single-file readers (`io.single_file` for SD 1.x / 2.x, `io.sdxl_single_file` for SDXL) and the
ControlNet reader (`io.controlnet_files`) use them.
"""
from __future__ import annotations

import re

# --------------------------------------------------------------------------- splitting
def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- UNet
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _resnet_name(rest: str, key: str) -> str:
    for old, new in _RESNET.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise ValueError(f"UNet tensor with no ldmkit counterpart: model.diffusion_model.{key} "
                     f"(a ResBlock holds only {', '.join(_RESNET)})")


def _indices(state: dict, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})


def unet_to_diffusers(state: dict, family: str, num_heads=None, num_head_channels=None):
    """LDM UNet tensors (prefix stripped) -> (diffusers UNet2DConditionModel config, renamed tensors)."""
    n_in = len(_indices(state, "input_blocks."))
    levels = 1 + sum(1 for k in state if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    if n_in % levels:
        raise ValueError(f"cannot infer UNet layout: {n_in} input blocks for {levels} levels")
    layers = n_in // levels - 1

    def has_attn(prefix):
        return f"{prefix}.proj_in.weight" in state

    out, used = {}, set()

    def put(new, old):
        if new in out:
            raise ValueError(f"two UNet tensors map to {new}")
        out[new] = state[old]
        used.add(old)

    def move(old_prefix, new_prefix, resnet=False):
        for k in [k for k in state if k.startswith(old_prefix + ".")]:
            rest = k[len(old_prefix) + 1:]
            put(f"{new_prefix}.{_resnet_name(rest, k) if resnet else rest}", k)

    channels, down_attn = [], []
    for i in range(1, n_in):
        b, j = divmod(i - 1, layers + 1)
        if j < layers:
            move(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}", resnet=True)
            if has_attn(f"input_blocks.{i}.1"):
                move(f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}")
            if j == 0:
                channels.append(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
                down_attn.append(has_attn(f"input_blocks.{i}.1"))
        else:
            move(f"input_blocks.{i}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
    mid_attn = has_attn("middle_block.1")
    for idx, new in enumerate(["resnets.0", "attentions.0", "resnets.1"] if mid_attn else ["resnets.0", "resnets.1"]):
        move(f"middle_block.{idx}", f"mid_block.{new}", resnet=new.startswith("resnets"))
    up_attn = []
    for i in _indices(state, "output_blocks."):
        b, j = divmod(i, layers + 1)
        move(f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", resnet=True)
        attn = has_attn(f"output_blocks.{i}.1")
        if attn:
            move(f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}")
        up_sub = 2 if attn else 1
        if f"output_blocks.{i}.{up_sub}.conv.weight" in state:
            move(f"output_blocks.{i}.{up_sub}.conv", f"up_blocks.{b}.upsamplers.0.conv")
        if j == 0:
            up_attn.append(attn)
    for old, new in (("input_blocks.0.0", "conv_in"), ("time_embed.0", "time_embedding.linear_1"),
                     ("time_embed.2", "time_embedding.linear_2"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        move(old, new)
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"UNet tensors with no ldmkit counterpart: {unused[:8]}"
                         + (f" (+{len(unused) - 8} more)" if len(unused) > 8 else ""))
    layout = dict(channels=channels, layers=layers, down_attn=down_attn, up_attn=up_attn, mid_attn=mid_attn)
    return _unet_config(state, out, family, layout, num_heads, num_head_channels), out


def _unet_config(state: dict, out: dict, family: str, layout: dict, num_heads, num_head_channels) -> dict:
    """The diffusers config of a UNet whose tensors `unet_to_diffusers` renamed (`out`) and whose level
    layout it read (`layout`: widths, layers, attention per level)."""
    channels, down_attn = layout["channels"], layout["down_attn"]
    attn_key = next((k for k in out if k.endswith("attn2.to_k.weight")), None)
    proj_key = next((k for k in out if k.endswith("proj_in.weight")), None)
    depth = []
    for b, a in enumerate(down_attn):
        depth.append(len(_indices(out, f"down_blocks.{b}.attentions.0.transformer_blocks.")) if a else 1)
    if num_heads is None and num_head_channels is None:
        # SD 1.x uses 8 heads everywhere; SD 2.x uses 64-channel heads (CompVis yaml num_heads / num_head_channels)
        num_heads, num_head_channels = (8, None) if family == "sd1" else (None, 64)
    if num_head_channels is not None:
        bad = [c for c in channels if c % num_head_channels]
        if bad:
            raise ValueError(f"num_head_channels={num_head_channels} does not divide UNet widths {bad}; "
                             "pass num_heads or num_head_channels matching the model")
        heads = [c // num_head_channels for c in channels]
    else:
        heads = num_heads
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": state["input_blocks.0.0.weight"].shape[1],
        # a ControlNet's copy of the UNet has no output layers
        "out_channels": (state["out.2.weight"].shape[0] if "out.2.weight" in state
                         else state["input_blocks.0.0.weight"].shape[1]),
        "block_out_channels": channels,
        "layers_per_block": layout["layers"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout["up_attn"]],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if layout["mid_attn"] else "UNetMidBlock2D",
        "cross_attention_dim": out[attn_key].shape[1] if attn_key else 768,
        "attention_head_dim": heads,
        "use_linear_projection": bool(proj_key is not None and out[proj_key].ndim == 2),
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "upcast_attention": family == "sd2",
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


# --------------------------------------------------------------------------- autoencoder
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_to_diffusers(state: dict, scaling_factor: float = 0.18215, shift_factor: float | None = None):
    """LDM KL autoencoder tensors (prefix stripped) -> (diffusers AutoencoderKL config, renamed tensors).
    SD3's 16-channel autoencoder has no quant convs (use_quant_conv / use_post_quant_conv false) and a
    `shift_factor`."""
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # training losses, not the model
    n_down = len(_indices(state, "encoder.down."))
    n_up = len(_indices(state, "decoder.up."))
    if n_down == 0 or n_down != n_up:
        raise ValueError(f"cannot infer the autoencoder layout: {n_down} encoder levels, {n_up} decoder levels")
    out, used = {}, set()

    def put(new, old, squeeze=False):
        t = state[old]
        out[new] = t.reshape(t.shape[0], t.shape[1]) if squeeze and t.ndim == 4 else t
        used.add(old)

    def move(old_prefix, new_prefix):
        for k in [k for k in state if k.startswith(old_prefix + ".")]:
            rest = k[len(old_prefix) + 1:].replace("nin_shortcut", "conv_shortcut")
            put(f"{new_prefix}.{rest}", k)

    def move_mid(side):
        move(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        move(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        for old, new in _VAE_ATTN.items():
            for p in ("weight", "bias"):
                k = f"{side}.mid.attn_1.{old}.{p}"
                if k in state:  # 1x1 convs in LDM, linear layers in diffusers
                    put(f"{side}.mid_block.attentions.0.{new}.{p}", k, squeeze=new != "group_norm")

    channels, layers = [], len(_indices(state, "encoder.down.0.block."))
    for i in range(n_down):
        move(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        for j in _indices(state, f"encoder.down.{i}.block."):
            move(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        channels.append(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0])
    for i in range(n_up):
        b = n_up - 1 - i  # LDM counts decoder levels from the bottom, diffusers from the top
        move(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv")
        for j in _indices(state, f"decoder.up.{i}.block."):
            move(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}")
    for side in ("encoder", "decoder"):
        move_mid(side)
        for name in ("conv_in", "conv_out"):
            move(f"{side}.{name}", f"{side}.{name}")
        move(f"{side}.norm_out", f"{side}.conv_norm_out")
    for name in ("quant_conv", "post_quant_conv"):
        move(name, name)
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"autoencoder tensors with no ldmkit counterpart: {unused[:8]}")
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * n_down,
        "up_block_types": ["UpDecoderBlock2D"] * n_up,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": state["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 512,
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
    }
    if shift_factor is not None:
        config["shift_factor"] = shift_factor
    return config, out


# --------------------------------------------------------------------------- text encoder
_OPENCLIP = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
             ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]


def clip_to_transformers(state: dict):
    """SD 1.x text encoder (prefix stripped; HF names with or without `text_model.`) -> (config, tensors).

    Tensor names are CLIPTextModel's without the `text_model.` level (transformers >= 5 layout).
    """
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue  # a buffer of arange(77), rebuilt by transformers
        out[k[len("text_model."):] if k.startswith("text_model.") else k] = v
    return _clip_config(out, hidden_act="quick_gelu"), out, []


def openclip_to_transformers(state: dict, keep_all: bool = False):
    """SD 2.x OpenCLIP text tower (prefix stripped) -> (CLIPTextModel config, tensors, notes).

    SD 2.x conditions on the penultimate layer followed by `ln_final`, so the last
    residual block is dropped and the CLIPTextModel gets one layer fewer; the
    `text_projection` and `logit_scale` of the contrastive head are unused by SD.
    `keep_all` (SDXL): every block, and `text_projection` (x @ P) as a CLIPTextModelWithProjection's
    `text_projection.weight` (P transposed).
    """
    n_blocks = len(_indices(state, "transformer.resblocks."))
    last = n_blocks if keep_all else n_blocks - 1
    out, notes, skipped = {}, [], []
    for k, v in state.items():
        if k == "text_projection" and keep_all:
            out["text_projection.weight"] = v.t().contiguous()
            continue
        if k in ("text_projection", "logit_scale", "attn_mask"):
            skipped.append(k)
            continue
        if k == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["final_layer_norm." + k[len("ln_final."):]] = v
        elif k.startswith("transformer.resblocks."):
            idx, rest = k[len("transformer.resblocks."):].split(".", 1)
            if int(idx) == last:
                skipped.append(k)
                continue
            base = f"encoder.layers.{idx}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                q, kk, vv = v.chunk(3, dim=0)  # OpenCLIP packs q, k, v in one projection
                for name, part in (("q_proj", q), ("k_proj", kk), ("v_proj", vv)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            for old, new in _OPENCLIP:
                if rest.startswith(old):
                    out[base + new + rest[len(old):]] = v
                    break
            else:
                raise ValueError(f"OpenCLIP tensor with no CLIPTextModel counterpart: cond_stage_model.model.{k}")
        else:
            raise ValueError(f"OpenCLIP tensor with no CLIPTextModel counterpart: cond_stage_model.model.{k}")
    config = _clip_config(out, hidden_act="gelu")
    if keep_all:
        config["projection_dim"] = out["text_projection.weight"].shape[0] if "text_projection.weight" in out else \
            config["hidden_size"]
        return config, out, notes
    notes.append(f"SD 2.x text encoder: used the penultimate layer, skipped {len(skipped)} tensors "
                 f"(last residual block {last}, text_projection, logit_scale)")
    return config, out, notes


def _clip_config(state: dict, hidden_act: str) -> dict:
    tok = state["embeddings.token_embedding.weight"]
    hidden = tok.shape[1]
    return {
        "vocab_size": tok.shape[0],
        "hidden_size": hidden,
        "intermediate_size": state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_indices(state, "encoder.layers.")),
        # CLIP ViT-L/14 (12 heads of 64) and OpenCLIP ViT-H/14 (16 heads of 64): 64-wide heads
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": state["embeddings.position_embedding.weight"].shape[0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,  # legacy ids: pooled output at argmax(ids)
    }
