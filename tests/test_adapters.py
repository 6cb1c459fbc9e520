"""Adapters on a frozen model: LoRA files (diffusers / peft, older diffusers layouts, kohya / A1111) and
textual-inversion embeddings (diffusers, A1111 .safetensors and .pt) load into ldmkit and give the
images diffusers gives with `load_lora_weights` / `load_textual_inversion` (PSNR >= 40 dB, latents
within 1e-4); `ldm sample --lora / --embedding` and `ldm convert --lora`; bad files are one-line errors.

The base model is a tiny random Stable Diffusion built with diffusers (tests/interop_models.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402

from ldmkit.adapters.lora import TARGETS, LoRA, LoRALayer, matching_modules, merge  # noqa: E402
from ldmkit.errors import UserError  # noqa: E402
from ldmkit.io.adapter_files import (lora_to_diffusers, read_embedding, read_lora, write_embedding,  # noqa: E402
                                     write_lora)

PROMPT = "the red cat"
SETTINGS = dict(height=16, width=16, num_inference_steps=6, guidance_scale=7.5)


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("adapters")
    pipe = im.build_pipeline("sd1", scheduler="ddim", workdir=root)
    pipe.save_pretrained(root / "sd1")
    return root


def random_lora(module_of: dict, groups: dict, rank=4, alpha=8.0, seed=1) -> LoRA:
    """Random factors for the layers of `groups` ({"unet": [...TARGETS keys], "text_encoder": [...]})."""
    g = torch.Generator().manual_seed(seed)
    lora = LoRA()
    for comp, names in groups.items():
        module = module_of[comp]
        suffixes = [s for n in names for s in TARGETS[n]]
        layers = {}
        for path in matching_modules(module, suffixes):
            m = dict(module.named_modules())[path]
            if isinstance(m, torch.nn.Conv2d):
                down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * 0.1
                up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.1
            else:
                down = torch.randn(rank, m.in_features, generator=g) * 0.1
                up = torch.randn(m.out_features, rank, generator=g) * 0.1
            layers[path.removeprefix("text_model.")] = LoRALayer(down, up, alpha)
        lora.layers[comp] = layers
    return lora


def fresh_diffusers(base: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base / "sd1", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe, prompt=PROMPT, seed=7):
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **SETTINGS).images[0]
    latents = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="latent", **SETTINGS).images
    return (out * 255).round().astype(np.uint8), latents


def ours(base: Path):
    from ldmkit.pipelines import load

    return load(base / "sd1", device="cpu", dtype=torch.float32)


def our_image(pipe, prompt=PROMPT, seed=7):
    kw = dict(sampler="ddim", steps=SETTINGS["num_inference_steps"], guidance=SETTINGS["guidance_scale"], height=16,
              width=16, progress=False)
    image = np.asarray(pipe.text2img(prompt, seed=seed, **kw)[0].image)
    latents = pipe.sample_latents(pipe.settings(**kw), [prompt], None, [seed])
    return image, latents


def psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def assert_same(ours_out, ref_out, what):
    (img, lat), (ref, ref_lat) = ours_out, ref_out
    p = psnr(img, ref)
    rel = float((lat - ref_lat).abs().max() / ref_lat.abs().max())
    print(f"{what}: PSNR {p:.1f} dB, latents max relative difference {rel:.1e}")
    assert p >= 40, f"{what}: PSNR {p:.1f} dB"
    assert rel <= 1e-4, f"{what}: latents differ by {rel:.1e}"


# ----------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_matches_diffusers_load_lora_weights(base, tmp_path, fmt):
    """UNet attention + resnet convs (LoCon) + text-encoder attention, alpha != rank: the same images."""
    ref = fresh_diffusers(base)
    lora = random_lora({"unet": ref.unet, "text_encoder": ref.text_encoder},
                       {"unet": ["attn", "conv"], "text_encoder": ["text"]})
    path = write_lora(tmp_path / f"lora-{fmt}.safetensors", lora, fmt)
    before = diffusers_image(ref)
    ref.load_lora_weights(str(tmp_path), weight_name=path.name)
    after = diffusers_image(ref)
    assert psnr(before[0], after[0]) < 35  # the LoRA changes the image
    pipe = ours(base)
    assert pipe.load_lora(path) == len(lora)
    assert_same(our_image(pipe), after, f"LoRA ({fmt} file)")


def test_two_loras_at_scales_match_diffusers_adapters(base, tmp_path):
    ref = fresh_diffusers(base)
    mods = {"unet": ref.unet, "text_encoder": ref.text_encoder}
    a = write_lora(tmp_path / "a.safetensors", random_lora(mods, {"unet": ["attn"]}, seed=1), "diffusers")
    b = write_lora(tmp_path / "b.safetensors", random_lora(mods, {"unet": ["attn", "ff"]}, seed=2), "kohya")
    ref.load_lora_weights(str(tmp_path), weight_name=a.name, adapter_name="a")
    ref.load_lora_weights(str(tmp_path), weight_name=b.name, adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    pipe = ours(base)
    pipe.load_lora(a, 0.7)
    pipe.load_lora(b, -0.4)
    assert_same(our_image(pipe), diffusers_image(ref), "two LoRAs at 0.7 and -0.4")


def test_a_lora_saved_by_diffusers_with_alpha_metadata(base, tmp_path):
    """diffusers' own writer (peft state dict + lora_adapter_metadata with lora_alpha != r)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = fresh_diffusers(base)
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in ref.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref.unet),
                                              unet_lora_adapter_metadata=ref.unet.peft_config["default"].to_dict())
    file = tmp_path / "pytorch_lora_weights.safetensors"
    assert all(layer.alpha == 12 for layer in read_lora(file).layers["unet"].values())
    fresh = fresh_diffusers(base)
    fresh.load_lora_weights(str(tmp_path))
    pipe = ours(base)
    pipe.load_lora(file)
    assert_same(our_image(pipe), diffusers_image(fresh), "diffusers-written LoRA with alpha metadata")


def test_older_diffusers_layouts_read_as_the_same_layers(base, tmp_path):
    """lora.down / lora.up (LoRACompatibleLinear), attention-processor (to_q_lora) and lora_linear_layer
    (text encoder) keys give the layers of the peft file they were renamed from."""
    ref = fresh_diffusers(base)
    lora = random_lora({"unet": ref.unet, "text_encoder": ref.text_encoder},
                       {"unet": ["attn"], "text_encoder": ["text"]}, alpha=None)
    peft_keys = lora_to_diffusers(lora)

    def old(key):
        key = key.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight")
        if key.startswith("text_encoder."):
            return key.replace(".lora.", ".lora_linear_layer.")
        if ".attn1." in key or ".attn2." in key:  # attention processors: attn1.processor.to_q_lora.down.weight
            head, _, rest = key.partition(".lora.")
            module, proj = head.rsplit(".", 1) if not head.endswith("to_out.0") else (head[:-len(".to_out.0")], "to_out")
            return f"{module}.processor.{proj}_lora.{rest}"
        return key

    from safetensors.torch import save_file

    save_file({old(k): v for k, v in peft_keys.items()}, str(tmp_path / "old.safetensors"))
    got = read_lora(tmp_path / "old.safetensors")
    assert got.metadata["ldmkit_format"] == "diffusers"
    for comp, layers in lora.layers.items():
        text_prefix = "text_model." if comp == "text_encoder" else ""
        assert set(got.layers[comp]) == {text_prefix + p for p in layers}
        for p, layer in layers.items():
            assert torch.equal(got.layers[comp][text_prefix + p].down, layer.down)


def test_merge_math_and_partial_match_warning(base):
    pipe = ours(base)
    layer = pipe.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    w0 = layer.weight.detach().clone()
    down, up = torch.randn(2, w0.shape[1]), torch.randn(w0.shape[0], 2)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = LoRA({"unet": {path: LoRALayer(down, up, 6.0), "down_blocks.9.nope.to_q": LoRALayer(down, up, 6.0)}})
    with pytest.warns(UserWarning, match="1 of 2 layers match no layer"):
        assert merge({"denoiser": pipe.denoiser}, lora, 0.5) == 1
    assert torch.allclose(layer.weight, w0 + 0.5 * 3.0 * up @ down, atol=1e-5)


# ----------------------------------------------------------------------------------------- bad LoRA files
def _bad(tmp_path, name, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / name), metadata=metadata)
    return tmp_path / name


@pytest.mark.parametrize("case,match", [
    ("no-match", "none of its 1 layers matches"),
    ("rank", "of one rank r"),
    ("width", "do not fit the model's weight"),
    ("missing-up", "has no up weight"),
    ("lycoris", "LyCORIS"),
    ("not-lora", "is not a LoRA file"),
    ("nan", "not finite"),
    ("alpha", "alpha .* not one finite number"),
    ("metadata", "not valid JSON"),
])
def test_bad_lora_files_are_one_line_errors(base, tmp_path, case, match):
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    files = {
        "no-match": {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
                     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4)},
        "rank": {f"{q}.lora_down.weight": torch.zeros(4, 32), f"{q}.lora_up.weight": torch.zeros(32, 2)},
        "width": {f"{q}.lora_down.weight": torch.zeros(4, 320), f"{q}.lora_up.weight": torch.zeros(320, 4)},
        "missing-up": {f"{q}.lora_down.weight": torch.zeros(4, 32)},
        "lycoris": {f"{q}.hada_w1_a": torch.zeros(4, 4)},
        "not-lora": {"model.diffusion_model.out.0.weight": torch.zeros(4)},
        "nan": {f"{q}.lora_down.weight": torch.full((4, 32), float("nan")), f"{q}.lora_up.weight": torch.zeros(32, 4)},
        "alpha": {f"{q}.lora_down.weight": torch.zeros(4, 32), f"{q}.lora_up.weight": torch.zeros(32, 4),
                  f"{q}.alpha": torch.tensor([1.0, 2.0])},
        "metadata": {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
                     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)},
    }
    meta = {"lora_adapter_metadata": "{not json"} if case == "metadata" else None
    path = _bad(tmp_path, f"{case}.safetensors", files[case], meta)
    pipe = ours(base)
    with pytest.raises(UserError, match=match):
        pipe.load_lora(path)


def test_cli_lora_embedding_and_convert(base, tmp_path):
    """`ldm sample --lora A:0.5 --lora B --embedding E:TOKEN`, the PNG's "Lora hashes", a bad LoRA as one
    line with exit 2, and `ldm convert --lora` giving the merged weights."""
    ref = fresh_diffusers(base)
    mods = {"unet": ref.unet, "text_encoder": ref.text_encoder}
    a = write_lora(tmp_path / "a.safetensors", random_lora(mods, {"unet": ["attn"]}), "kohya")
    emb = write_embedding(tmp_path / "thing.safetensors", "thing", torch.randn(2, 128), "a1111")
    out = tmp_path / "img.png"
    cmd = [sys.executable, "-m", "ldmkit.cli", "sample", "--model", str(base / "sd1"), "--prompt", "a <thing> cat",
           "--lora", f"{a}:0.5", "--embedding", f"{emb}:<thing>", "--steps", "2", "--seed", "3", "--out", str(out),
           "--device", "cpu", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "LoRA" in r.stderr and "2 vector" in r.stderr
    from PIL import Image

    params = Image.open(out).text["parameters"]
    assert 'Lora hashes: "a: ' in params and 'TI hashes: "<thing>: ' in params
    bad = _bad(tmp_path, "bad.safetensors", {"x": torch.zeros(1)})
    r = subprocess.run([sys.executable, "-m", "ldmkit.cli", "sample", "--model", str(base / "sd1"), "--prompt", "x",
                        "--lora", str(bad), "--steps", "2", "--out", str(tmp_path / "x.png"), "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "is not a LoRA file" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ldmkit.cli", "convert", "--from", str(base / "sd1"), "--to",
                        str(tmp_path / "merged"), "--lora", f"{a}:0.5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged, loaded = ours(base), None
    merged.load_lora(a, 0.5)
    from ldmkit.pipelines import load

    loaded = load(tmp_path / "merged", device="cpu", dtype=torch.float32)
    for (k, v), w in zip(merged.denoiser.state_dict().items(), loaded.denoiser.state_dict().values()):
        assert torch.equal(v, w), k


# ----------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("fmt", ["diffusers", "a1111", "a1111-pt"])
def test_embedding_matches_diffusers_load_textual_inversion(base, tmp_path, fmt):
    vectors = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    if fmt == "a1111-pt":
        path = tmp_path / "kitty.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "kitty", "step": 10},
                   path)
    else:
        path = write_embedding(tmp_path / ("learned_embeds.safetensors" if fmt == "diffusers" else "kitty.safetensors"),
                               "<kitty>", vectors, fmt)
    token = "<kitty>" if fmt == "diffusers" else "kitty"
    assert read_embedding(path)[1].shape == (3, 128)
    ref = fresh_diffusers(base)
    ref.load_textual_inversion(str(path), token=token)
    prompt = f"a photo of {token} on the street"
    pipe = ours(base)
    assert pipe.load_embedding(path, None if fmt == "diffusers" else token) == [token, f"{token}_1", f"{token}_2"]
    assert_same(our_image(pipe, prompt), diffusers_image(ref, prompt), f"embedding ({fmt})")


def test_bad_embeddings(base, tmp_path):
    pipe = ours(base)
    wide = write_embedding(tmp_path / "wide.safetensors", "<w>", torch.randn(1, 768))
    with pytest.raises(UserError, match="width 768 do not fit this text encoder, whose token embeddings have width 128"):
        pipe.load_embedding(wide)
    taken = write_embedding(tmp_path / "cat.safetensors", "cat</w>", torch.randn(1, 128))
    with pytest.raises(UserError, match="already in the tokenizer's vocabulary"):
        pipe.load_embedding(taken)
    from safetensors.torch import save_file

    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(UserError, match="SDXL embedding"):
        pipe.load_embedding(tmp_path / "xl.safetensors")
    save_file({"a": torch.randn(1, 128), "b": torch.randn(1, 128)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(UserError, match="not a textual-inversion embedding"):
        pipe.load_embedding(tmp_path / "two.safetensors")
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04cos\nsystem\n.")
    with pytest.raises(UserError, match="refused|not a readable"):
        pipe.load_embedding(tmp_path / "evil.pt")
    json.dumps(pipe.adapters)  # nothing half-loaded is recorded
    assert pipe.adapters == []
