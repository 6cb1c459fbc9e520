"""SDXL in diffusers' layout: the text encoders of `StableDiffusionXLPipeline` folders (base:
text_encoder/ = CLIPTextModel + tokenizer/, text_encoder_2/ = CLIPTextModelWithProjection + tokenizer_2/;
refiner: text_encoder_2/ only) and the options in model_index.json (`force_zeros_for_empty_prompt`,
`requires_aesthetics_score`). The UNet, VAE and scheduler read as SD's do (`io.diffusers_format`).
"""
from __future__ import annotations

from pathlib import Path

from ldmkit.io.files import read_json

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
DEFAULTS = {"steps": 50, "guidance": 5.0}  # diffusers' SDXL pipeline defaults


def read_sdxl_texts(root: Path, index: dict, read_weights) -> tuple[list[dict], dict]:
    """([{config, state, tokenizer, projection} per text encoder, in order], options) of an SDXL folder;
    `read_weights(folder)` reads a text encoder's tensors (`io.diffusers_format` passes its reader)."""
    texts = []
    for sub, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if index.get(sub, [None, None])[0] is None and not (root / sub).is_dir():
            continue  # the refiner has no first encoder
        for folder in (sub, tok):
            if not (root / folder).is_dir():
                raise FileNotFoundError(f"{root} is not a complete diffusers SDXL folder: {folder}/ is missing")
        config = read_json(root / sub / "config.json")
        texts.append({"config": config, "state": read_weights(root / sub),
                      "tokenizer": root / tok, "projection": "WithProjection" in str(config.get("architectures"))
                      or sub == "text_encoder_2"})
    if not texts:
        raise FileNotFoundError(f"{root} is not a complete diffusers SDXL folder: text_encoder_2/ is missing")
    options = {"force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True),
               "requires_aesthetics_score": index.get("requires_aesthetics_score", False)}
    for name, value in options.items():
        if not isinstance(value, bool):
            raise ValueError(f"{root / 'model_index.json'}: {name}={value!r} must be true or false")
    return texts, options


def build_sdxl_conditioner(texts: list[dict], options: dict, max_length: int | None = None, clip_skip: int = 0):
    """The SDXLTextEncoder of `read_sdxl_texts`'s parts (weights checked by name and shape)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ldmkit.conditioning.sdxl import SDXLTextEncoder
    from ldmkit.conditioning.text import check_hf_text_config, hf_config_fields, load_hf_tokenizer
    from ldmkit.io.files import check_state_dict

    models, tokenizers = [], []
    for k, part in enumerate(texts):
        what = f"text encoder {k + 1}"
        check_hf_text_config(part["config"], f"{what} config")
        cfg = hf_config_fields(part["config"])
        if cfg.pop("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
            raise ValueError(f"{what}: model_type is not a CLIP text model")
        hf = CLIPTextConfig.from_dict(cfg)
        model = (CLIPTextModelWithProjection if part["projection"] else CLIPTextModel)(hf)
        state = {key: v for key, v in part["state"].items() if not key.endswith("position_ids")}
        own = model.state_dict()
        inner = any(key.startswith("text_model.") for key in own)  # how this transformers version names them
        state = {_rename(key, inner): v for key, v in state.items()}
        for key in own:
            if key.endswith("position_ids") and key not in state:
                state[key] = own[key]
        check_state_dict(model, state, what)  # names missing / unexpected keys and shape mismatches
        model.load_state_dict(state, strict=True)
        model.eval()
        tok = part["tokenizer"]
        if isinstance(tok, (str, Path)):  # a folder (diffusers' layout); single files bring tokenizer objects
            folder = Path(tok)
            tok = load_hf_tokenizer(lambda f=folder: CLIPTokenizer.from_pretrained(str(f), local_files_only=True),
                                    folder)
        if len(tok) > hf.vocab_size:
            raise ValueError(f"{what}: the tokenizer has {len(tok)} tokens, the encoder embeds {hf.vocab_size}")
        models.append(model)
        tokenizers.append(tok)
    return SDXLTextEncoder.build(models, tokenizers, max_length, clip_skip, **options)


def _rename(key: str, inner: bool) -> str:
    """A text-encoder tensor name as this transformers version's model names it (`text_model.` or not)."""
    if key.startswith("text_projection"):
        return key
    bare = key.removeprefix("text_model.")
    return f"text_model.{bare}" if inner else bare


__all__ = ["DEFAULTS", "SDXL_PIPELINES", "build_sdxl_conditioner", "read_sdxl_texts"]
