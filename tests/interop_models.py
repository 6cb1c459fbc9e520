"""Tiny random Stable Diffusion models for the interop tests, built locally (no downloads).

`build_pipeline(style)` makes a diffusers StableDiffusionPipeline with random
weights: "sd1" (conv projections, 8 heads, CLIP quick-gelu text encoder, eps)
or "sd2" (linear projections, 64-wide heads, upcast attention, GELU text
encoder standing for OpenCLIP's penultimate layer, v-prediction).

`to_original_checkpoint(pipe, style)` writes the same weights in the original
CompVis/LDM single-file layout. The layout is produced from the hand-written
table below, which walks the modules in the order CompVis' `UNetModel`,
`Encoder`/`Decoder` and OpenCLIP's `TextTransformer` create them; it is not
derived from ldmkit's converter, and the tests check it against diffusers' own
LDM->diffusers conversion functions.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- tokenizer
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["t h", "th e</w>", "a n", "o n</w>", "r e", "c a", "ca t</w>", "re d</w>", "s t", "o r"]


def write_tokenizer_files(folder: Path) -> Path:
    """A tiny CLIP BPE vocabulary: single letters (plain and word-final) plus a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["!"] + list(LETTERS) + [c + "</w>" for c in LETTERS]
    tokens += [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return folder


def make_tokenizer(folder: Path, style: str):
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    pad = "<|endoftext|>" if style == "sd1" else "!"  # SD 2.x (OpenCLIP) pads with "!"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad,
                         model_max_length=77)


# ----------------------------------------------------------------------------- models
def captioned_images(folder: Path, n: int = 6) -> Path:
    """`n` random 20x24 images with alternating captions ("the red cat" / "a cat on the street") in .txt files."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("the red cat" if i % 2 else "a cat on the street")
    return folder


def build_pipeline(style: str, scheduler: str = "ddim", seed: int = 0, workdir: Path | None = None):
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    sd2 = style == "sd2"
    width = 128  # text width = cross-attention width; 2 heads of 64 (the rule for SD's CLIP and OpenCLIP)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 64, 128) if sd2 else (32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 1, 2) if sd2 else 8, cross_attention_dim=width, norm_num_groups=32,
        use_linear_projection=sd2, upcast_attention=sd2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.18215)
    tokenizer = make_tokenizer(Path(workdir or ".") / f"tok-{style}", style)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    # randomise norms and biases too, so that a mis-mapped tensor cannot hide behind a default init
    with torch.no_grad():
        for module in (unet, vae, text):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    for m in (unet, vae, text):
        m.eval()
    sched_cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="v_prediction" if sd2 else "epsilon", steps_offset=1,
                     timestep_spacing="leading")
    if scheduler == "ddim":
        sched = DDIMScheduler(**sched_cfg, clip_sample=False, set_alpha_to_one=False)
    else:
        sched = DPMSolverMultistepScheduler(**sched_cfg, algorithm_type="dpmsolver++", solver_order=2)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# ----------------------------------------------------------------------------- the LDM layout table
# ResBlock sub-layers: CompVis names (in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, conv], skip_connection) vs diffusers' ResnetBlock2D names.
LDM_RESBLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_table(cfg) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resblock) in the order CompVis' UNetModel builds its modules."""
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    rows = [("time_embedding.linear_1", "time_embed.0", False), ("time_embedding.linear_2", "time_embed.2", False),
            ("conv_in", "input_blocks.0.0", False)]
    block = 1
    for level in range(n):
        attn = cfg.down_block_types[level] == "CrossAttnDownBlock2D"
        for r in range(per):
            rows.append((f"down_blocks.{level}.resnets.{r}", f"input_blocks.{block}.0", True))
            if attn:
                rows.append((f"down_blocks.{level}.attentions.{r}", f"input_blocks.{block}.1", False))
            block += 1
        if level < n - 1:
            rows.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{block}.0.op", False))
            block += 1
    rows += [("mid_block.resnets.0", "middle_block.0", True), ("mid_block.attentions.0", "middle_block.1", False),
             ("mid_block.resnets.1", "middle_block.2", True)]
    block = 0
    for level in range(n):  # diffusers' up_blocks[0] is CompVis' deepest output level
        attn = cfg.up_block_types[level] == "CrossAttnUpBlock2D"
        for r in range(per + 1):
            rows.append((f"up_blocks.{level}.resnets.{r}", f"output_blocks.{block}.0", True))
            if attn:
                rows.append((f"up_blocks.{level}.attentions.{r}", f"output_blocks.{block}.1", False))
            if level < n - 1 and r == per:
                rows.append((f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{block}.{2 if attn else 1}.conv",
                             False))
            block += 1
    rows += [("conv_norm_out", "out.0", False), ("conv_out", "out.2", False)]
    return rows


def ldm_vae_table(cfg) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_attention) for CompVis' Encoder / Decoder."""
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    rows = []
    for side in ("encoder", "decoder"):
        rows += [(f"{side}.conv_in", f"{side}.conv_in", False), (f"{side}.conv_out", f"{side}.conv_out", False),
                 (f"{side}.conv_norm_out", f"{side}.norm_out", False),
                 (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", False),
                 (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", False),
                 (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", True)]
    for i in range(n):
        for j in range(per):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", False))
        if i < n - 1:
            rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", False))
        for j in range(per + 1):  # CompVis numbers decoder levels from the lowest resolution up
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}", False))
        if i < n - 1:
            rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv", False))
    rows += [("quant_conv", "quant_conv", False), ("post_quant_conv", "post_quant_conv", False)]
    return rows


LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, rows, sub) -> str:
    for hf, ldm, flag in sorted(rows, key=lambda r: -len(r[0])):
        if key.startswith(hf + "."):
            rest = key[len(hf) + 1:]
            return ldm + "." + sub(rest, flag)
    raise KeyError(f"no LDM row for {key}")


def _resblock_rest(rest: str, is_res: bool) -> str:
    if is_res:
        head, tail = rest.split(".", 1)
        return LDM_RESBLOCK[head] + "." + tail
    return rest


def _vae_rest(rest: str, is_attn: bool) -> str:
    if is_attn:
        for hf, ldm in LDM_VAE_ATTENTION.items():
            if rest.startswith(hf + "."):
                return ldm + rest[len(hf):]
    return rest.replace("conv_shortcut", "nin_shortcut")


def to_original_checkpoint(pipe, style: str, extra_block_seed: int = 123) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original single-file layout (+ the schedule buffers CompVis stores)."""
    sd = {}
    ucfg, vcfg = pipe.unet.config, pipe.vae.config
    urows, vrows = ldm_unet_table(ucfg), ldm_vae_table(vcfg)
    for k, v in pipe.unet.state_dict().items():
        sd["model.diffusion_model." + _rename(k, urows, _resblock_rest)] = v.clone()
    for k, v in pipe.vae.state_dict().items():
        new = _rename(k, vrows, _vae_rest)
        if ".mid.attn_1." in new and v.ndim == 2:
            v = v[:, :, None, None]  # CompVis uses 1x1 convolutions for q, k, v, proj_out
        sd["first_stage_model." + new] = v.clone()
    # CLIPTextModel names without the `text_model.` level (transformers >= 5 drops it from state dicts)
    text = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()
            if not k.endswith("position_ids")}
    if style == "sd1":  # SD 1.x files hold the HF CLIPTextModel names under cond_stage_model.transformer.text_model.
        for k, v in text.items():
            sd["cond_stage_model.transformer.text_model." + k] = v.clone()
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        sd.update(_openclip_layout(text, pipe.text_encoder.config, extra_block_seed))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    sd["betas"] = betas.float()
    sd["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return sd


def _openclip_layout(text: dict, cfg, seed: int) -> dict:
    """OpenCLIP TextTransformer names; one more residual block than the CLIPTextModel (SD 2 drops it)."""
    p, tm = "cond_stage_model.model.", ""
    out = {p + "token_embedding.weight": text[tm + "embeddings.token_embedding.weight"],
           p + "positional_embedding": text[tm + "embeddings.position_embedding.weight"],
           p + "ln_final.weight": text[tm + "final_layer_norm.weight"],
           p + "ln_final.bias": text[tm + "final_layer_norm.bias"]}
    g = torch.Generator().manual_seed(seed)
    d = cfg.hidden_size
    for i in range(cfg.num_hidden_layers + 1):
        src = f"{tm}encoder.layers.{i}."
        dst = f"{p}transformer.resblocks.{i}."

        def get(name, shape):
            return text[src + name] if i < cfg.num_hidden_layers else torch.randn(shape, generator=g) * 0.02

        for kind, shape in (("weight", (d, d)), ("bias", (d,))):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [get(f"self_attn.{n}_proj.{kind}", shape) for n in ("q", "k", "v")], 0)
            out[dst + f"attn.out_proj.{kind}"] = get(f"self_attn.out_proj.{kind}", shape)
            out[dst + f"ln_1.{kind}"] = get(f"layer_norm1.{kind}", (d,))
            out[dst + f"ln_2.{kind}"] = get(f"layer_norm2.{kind}", (d,))
        ff = cfg.intermediate_size
        out[dst + "mlp.c_fc.weight"] = get("mlp.fc1.weight", (ff, d))
        out[dst + "mlp.c_fc.bias"] = get("mlp.fc1.bias", (ff,))
        out[dst + "mlp.c_proj.weight"] = get("mlp.fc2.weight", (d, ff))
        out[dst + "mlp.c_proj.bias"] = get("mlp.fc2.bias", (d,))
    out[p + "text_projection"] = torch.randn(d, d, generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6052)
    return {k: v.clone() for k, v in out.items()}


# ----------------------------------------------------------------------------- SDXL
def build_sdxl_pipeline(refiner: bool = False, scheduler: str = "euler", seed: int = 0, workdir: Path | None = None):
    """A random tiny SDXL (StableDiffusionXLPipeline) or SDXL refiner (StableDiffusionXLImg2ImgPipeline,
    the second text encoder only, aesthetic-score time ids): SDXL's shapes at small widths -- no
    attention at the first level, 2 transformer layers at the last, the text encoders' penultimate states
    side by side (64 + 128 = 192 wide), the second's projected pooled output (48) plus 6 (5) time ids."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    widths, pooled, n_ids = ((128,), 48, 5) if refiner else ((64, 128), 48, 6)
    unet = UNet2DConditionModel(  # 64-wide heads, as SDXL's (single files do not record the head count)
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(1, 2), cross_attention_dim=sum(widths),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=pooled + n_ids * 8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.13025)
    tok = make_tokenizer(Path(workdir or ".") / "tok-sdxl", "sd1")
    tok2 = make_tokenizer(Path(workdir or ".") / "tok-sdxl-2", "sd2")  # OpenCLIP's: pads with "!"
    texts = []
    for k, width in enumerate((64, 128)):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                             num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=pooled,
                             hidden_act="quick_gelu" if k == 0 else "gelu", bos_token_id=0, eos_token_id=2,
                             pad_token_id=1)
        texts.append(CLIPTextModel(cfg) if k == 0 else CLIPTextModelWithProjection(cfg))
    with torch.no_grad():
        for module in (unet, vae, *texts):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    for m in (unet, vae, *texts):
        m.eval()
    sched_cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, timestep_spacing="leading")
    sched = {"euler": lambda: EulerDiscreteScheduler(**sched_cfg),
             "ddim": lambda: DDIMScheduler(**sched_cfg, clip_sample=False, set_alpha_to_one=False),
             "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**sched_cfg, algorithm_type="dpmsolver++",
                                                             solver_order=2)}[scheduler]()
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=texts[1], tokenizer=None,
                                                tokenizer_2=tok2, unet=unet, scheduler=sched,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=texts[0], text_encoder_2=texts[1], tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched)


def to_original_sdxl(pipe, refiner: bool = False) -> dict[str, torch.Tensor]:
    """An SDXL (or refiner) pipeline's weights in Stability's single-file layout: the CompVis UNet with
    `label_emb.0.{0,2}` (the pooled-text + time-id MLP), `conditioner.embedders.K.transformer.text_model.*`
    for CLIP ViT-L (HF names) and `conditioner.embedders.K.model.*` for OpenCLIP ViT-bigG (all its blocks,
    ln_final and the [width, projection] text_projection matrix that OpenCLIP multiplies from the right)."""
    sd = {}
    urows = ldm_unet_table(pipe.unet.config) + [("add_embedding.linear_1", "label_emb.0.0", False),
                                                ("add_embedding.linear_2", "label_emb.0.2", False)]
    if pipe.unet.config.mid_block_type is None:
        urows = [r for r in urows if not r[0].startswith("mid_block")]
    for k, v in pipe.unet.state_dict().items():
        sd["model.diffusion_model." + _rename(k, urows, _resblock_rest)] = v.clone()
    for k, v in pipe.vae.state_dict().items():
        new = _rename(k, ldm_vae_table(pipe.vae.config), _vae_rest)
        sd["first_stage_model." + new] = (v[:, :, None, None] if ".mid.attn_1." in new and v.ndim == 2 else v).clone()
    k = 0
    if not refiner:
        for name, v in pipe.text_encoder.state_dict().items():
            if not name.endswith("position_ids"):
                sd["conditioner.embedders.0.transformer.text_model." + name.removeprefix("text_model.")] = v.clone()
        k = 1
    big = pipe.text_encoder_2
    text = {n.removeprefix("text_model."): v for n, v in big.state_dict().items() if not n.endswith("position_ids")}
    p = f"conditioner.embedders.{k}.model."
    sd[p + "token_embedding.weight"] = text["embeddings.token_embedding.weight"].clone()
    sd[p + "positional_embedding"] = text["embeddings.position_embedding.weight"].clone()
    sd[p + "ln_final.weight"], sd[p + "ln_final.bias"] = text["final_layer_norm.weight"], text["final_layer_norm.bias"]
    sd[p + "text_projection"] = text["text_projection.weight"].t().contiguous()
    for i in range(big.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            sd[dst + f"attn.in_proj_{kind}"] = torch.cat([text[src + f"self_attn.{n}_proj.{kind}"] for n in "qkv"], 0)
            sd[dst + f"attn.out_proj.{kind}"] = text[src + f"self_attn.out_proj.{kind}"]
            sd[dst + f"ln_1.{kind}"] = text[src + f"layer_norm1.{kind}"]
            sd[dst + f"ln_2.{kind}"] = text[src + f"layer_norm2.{kind}"]
            sd[dst + f"mlp.c_fc.{kind}"] = text[src + f"mlp.fc1.{kind}"]
            sd[dst + f"mlp.c_proj.{kind}"] = text[src + f"mlp.fc2.{kind}"]
    return {name: v.clone().contiguous() for name, v in sd.items()}


# ----------------------------------------------------------------------------- SD3
def build_sd3_pipeline(t5: bool = True, qk_norm: str | None = None, seed: int = 0, workdir: Path | None = None,
                       single_file: bool = False, dual_attention_layers: tuple = ()):
    """A random tiny StableDiffusion3Pipeline: MM-DiT (2 joint blocks of 2 x 16 heads), a 16-channel VAE
    without quant convs (scaling 1.5305, shift 0.0609), CLIP "L" (16 wide) and "G" (24 wide) with
    projections (16 each: pooled 32), T5 (64 wide: the joint width; the CLIPs' 40 are zero-padded to it)
    and FlowMatchEuler with shift 3. The T5 tokenizer is a CLIP BPE one (any tokenizer serves).

    `single_file`: the shapes an SD3 single file describes without a config -- 64-wide heads (CLIP "L" 64
    wide, "G" 128 wide with a projection to 32; the MM-DiT 64 wide, one head, or 4 x 16 with q / k norms, whose
    weights give their width), CLIP-L's projection the identity (SD3 pools CLIP-L unprojected), T5 v1.1's
    gated GELU, 192 wide (the CLIPs' 64 + 128)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    if single_file:
        widths, heads, proj, joint = (64, 128), (1, 2), (64, 32), 192
        mm = dict(attention_head_dim=16, num_attention_heads=4) if qk_norm else dict(attention_head_dim=64,
                                                                                       num_attention_heads=1)
        mm.update(caption_projection_dim=64, pooled_projection_dim=96)
        t5_cfg = dict(d_model=192, d_ff=96, d_kv=16, num_heads=4, feed_forward_proj="gated-gelu")
    else:
        widths, heads, proj, joint = (16, 24), (2, 2), (16, 16), 64
        mm = dict(attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32, pooled_projection_dim=32)
        t5_cfg = dict(d_model=64, d_ff=96, d_kv=16, num_heads=4)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, joint_attention_dim=joint,
                                out_channels=16, pos_embed_max_size=16, qk_norm=qk_norm,
                                dual_attention_layers=dual_attention_layers, **mm)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=16, norm_num_groups=32, sample_size=16, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    work = Path(workdir or ".")
    toks = [make_tokenizer(work / "tok-sd3-l", "sd1"), make_tokenizer(work / "tok-sd3-g", "sd2"),
            make_tokenizer(work / "tok-sd3-t5", "sd2")]
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(toks[0]), hidden_size=w, intermediate_size=2 * w, num_hidden_layers=3,
        num_attention_heads=heads[k], max_position_embeddings=77, projection_dim=proj[k],
        hidden_act="quick_gelu" if k == 0 else "gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1))
        for k, w in enumerate(widths)]
    t5_model = T5EncoderModel(T5Config(vocab_size=len(toks[2]), num_layers=2, relative_attention_num_buckets=8,
                                       dropout_rate=0.0, **t5_cfg)) if t5 else None
    with torch.no_grad():
        for module in (net, vae, *clips, *([t5_model] if t5 else [])):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        if single_file:
            clips[0].text_projection.weight.copy_(torch.eye(widths[0]))
    for m in (net, vae, *clips, *([t5_model] if t5 else [])):
        m.eval()
    return StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clips[0], tokenizer=toks[0], text_encoder_2=clips[1],
                                    tokenizer_2=toks[1], text_encoder_3=t5_model, tokenizer_3=toks[2] if t5 else None)


# ----------------------------------------------------------------------------- FLUX.1
def build_flux_pipeline(dev: bool = True, seed: int = 0, workdir: Path | None = None):
    """A random tiny FluxPipeline: the transformer (2 double + 2 single blocks, 2 x 16 heads, rope (4, 6, 6);
    with the guidance embedding: FLUX.1-dev, without: schnell), a 16-channel VAE without quant convs (FLUX's
    scaling 0.3611 and shift 0.1159), CLIP-L (its pooled output: 24 wide), T5 (32 wide) and FlowMatchEuler
    with FLUX's dynamic shift (dev) or shift 1 (schnell)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                                 guidance_embeds=dev, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=16, norm_num_groups=32, sample_size=16, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    work = Path(workdir or ".")
    toks = [make_tokenizer(work / "tok-flux-l", "sd1"), make_tokenizer(work / "tok-flux-t5", "sd2")]
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(toks[0]), hidden_size=24, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(toks[1]), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, dropout_rate=0.0))
    with torch.no_grad():
        for module in (net, vae, clip, t5):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    for m in (net, vae, clip, t5):
        m.eval()
    sched = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                             base_image_seq_len=256, max_image_seq_len=4096) if dev
             else FlowMatchEulerDiscreteScheduler(shift=1.0))
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=toks[0], text_encoder_2=t5,
                        tokenizer_2=toks[1], transformer=net)


# ----------------------------------------------------------------------------- SD3 / FLUX.1 single files
# Written from the original code's module names (Stability's `mmditx.py`: MMDiTX, JointBlock, DismantledBlock;
# BFL's `flux/model.py`: DoubleStreamBlock, SingleStreamBlock, LastLayer), not from ldmkit's converters; the
# tests check these tables against diffusers' own original->diffusers converters.
SD3_TOP = [("pos_embed.proj", "x_embedder.proj"), ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
           ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
           ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
           ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"), ("context_embedder", "context_embedder"),
           ("proj_out", "final_layer.linear")]
# DismantledBlock layers: (diffusers name in the image stream, in the text stream, original name)
SD3_BLOCK = [("norm1.linear", "norm1_context.linear", "adaLN_modulation.1"),
             ("attn.to_out.0", "attn.to_add_out", "attn.proj"),
             ("attn.norm_q", "attn.norm_added_q", "attn.ln_q"), ("attn.norm_k", "attn.norm_added_k", "attn.ln_k"),
             ("ff.net.0.proj", "ff_context.net.0.proj", "mlp.fc1"), ("ff.net.2", "ff_context.net.2", "mlp.fc2"),
             ("attn2.to_out.0", None, "attn2.proj"), ("attn2.norm_q", None, "attn2.ln_q"),
             ("attn2.norm_k", None, "attn2.ln_k")]
SD3_QKV = [(("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "attn.qkv"),
           (("attn2.to_q", "attn2.to_k", "attn2.to_v"), None, "attn2.qkv")]


def _shift_scale(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous rows (scale, shift) -> the original LastLayer's (shift, scale)."""
    scale, shift = t.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def to_original_mmdit(state: dict) -> dict:
    """An SD3Transformer2DModel state dict -> the original MM-DiT names (no prefix)."""
    src, out = dict(state), {}
    layers = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("transformer_blocks."))

    def take(new, old, f=lambda t: t):
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in src:
                out[f"{new}.{kind}"] = f(src.pop(f"{old}.{kind}"))

    out["pos_embed"] = src.pop("pos_embed.pos_embed")
    for hf, orig in SD3_TOP:
        take(orig, hf)
    take("final_layer.adaLN_modulation.1", "norm_out.linear", _shift_scale)
    for i in range(layers):
        for k, stream in enumerate(("x_block", "context_block")):
            pre, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}.{stream}."
            for row in SD3_BLOCK:
                if row[k] is not None:
                    last = stream == "context_block" and i == layers - 1 and row[2] == "adaLN_modulation.1"
                    take(dst + row[2], pre + row[k], _shift_scale if last else (lambda t: t))
            for row in SD3_QKV:
                if row[k] is not None and f"{pre}{row[k][0]}.weight" in src:
                    for kind in ("weight", "bias"):
                        out[f"{dst}{row[2]}.{kind}"] = torch.cat([src.pop(f"{pre}{n}.{kind}") for n in row[k]], 0)
    assert not src, f"no original name for {sorted(src)[:5]}"
    return out


def to_original_sd3(pipe, t5: bool = True, clips: bool = True) -> dict[str, torch.Tensor]:
    """A StableDiffusion3Pipeline's weights in Stability's single-file layout (`sd3_medium_incl_clips_t5xxlfp16`:
    the MM-DiT, the VAE in CompVis names; CLIP-L without its (identity) projection, as Stability's files)."""
    sd = {"model.diffusion_model." + k: v for k, v in to_original_mmdit(pipe.transformer.state_dict()).items()}
    for k, v in pipe.vae.state_dict().items():
        new = _rename(k, ldm_vae_table(pipe.vae.config), _vae_rest)
        sd["first_stage_model." + new] = v[:, :, None, None] if ".mid.attn_1." in new and v.ndim == 2 else v
    if clips:
        for name, enc in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
            for k, v in enc.state_dict().items():
                if k.endswith("position_ids") or (name == "clip_l" and k.startswith("text_projection")):
                    continue
                key = k if k.startswith("text_projection") else "text_model." + k.removeprefix("text_model.")
                sd[f"text_encoders.{name}.transformer.{key}"] = v
    if t5 and pipe.text_encoder_3 is not None:
        for k, v in pipe.text_encoder_3.state_dict().items():
            if k != "encoder.embed_tokens.weight":  # tied to shared.weight
                sd["text_encoders.t5xxl.transformer." + k] = v
    return {k: v.clone().contiguous() for k, v in sd.items()}


FLUX_TOP = [("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
            ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
            ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
            ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
            ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
            ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
            ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")]
FLUX_DOUBLE = [("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
               ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
               ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
               ("ff_context.net.2", "txt_mlp.2")]
FLUX_NORMS = [("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
              ("attn.norm_added_q", "txt_attn.norm.query_norm"), ("attn.norm_added_k", "txt_attn.norm.key_norm")]


def to_original_flux(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict -> Black Forest Labs' names (`flux1-dev.safetensors`)."""
    src, out = dict(state), {}

    def take(new, old, f=lambda t: t):
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in src:
                out[f"{new}.{kind}"] = f(src.pop(f"{old}.{kind}"))

    for hf, orig in FLUX_TOP:
        take(orig, hf)
    take("final_layer.adaLN_modulation.1", "norm_out.linear", _shift_scale)
    for i in sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}):
        pre, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for hf, orig in FLUX_DOUBLE:
            take(dst + orig, pre + hf)
        for hf, orig in FLUX_NORMS:  # QKNorm's RMSNorms keep a `scale`
            out[f"{dst}{orig}.scale"] = src.pop(f"{pre}{hf}.weight")
        for names, orig in ((("to_q", "to_k", "to_v"), "img_attn.qkv"),
                            (("add_q_proj", "add_k_proj", "add_v_proj"), "txt_attn.qkv")):
            for kind in ("weight", "bias"):
                out[f"{dst}{orig}.{kind}"] = torch.cat([src.pop(f"{pre}attn.{n}.{kind}") for n in names], 0)
    for i in sorted({int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}):
        pre, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        take(dst + "modulation.lin", pre + "norm.linear")
        take(dst + "linear2", pre + "proj_out")
        out[dst + "norm.query_norm.scale"] = src.pop(pre + "attn.norm_q.weight")
        out[dst + "norm.key_norm.scale"] = src.pop(pre + "attn.norm_k.weight")
        for kind in ("weight", "bias"):  # SingleStreamBlock.linear1: q, k, v and the MLP's input in one
            out[f"{dst}linear1.{kind}"] = torch.cat([src.pop(f"{pre}{n}.{kind}") for n in
                                                     ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")], 0)
    assert not src, f"no original name for {sorted(src)[:5]}"
    return {prefix + k: v.clone().contiguous() for k, v in out.items()}
