"""DiT: parity with diffusers' DiTTransformer2DModel through the key map, AdaLN-Zero identity at
init, shapes for other grids, gradients, and cross-attention."""

import dataclasses

import pytest
import torch

from ldmkit.denoisers.dit import (PRESETS, DiT, DiTConfig, pos_embed_2d, state_dict_from_diffusers,
                                  state_dict_to_diffusers)


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_parity_with_diffusers():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6).eval()
    _randomise(ref)
    # diffusers keeps one embedder per block; the original DiT (and ours) shares one: make them equal
    sd = ref.state_dict()
    for k in list(sd):
        if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
            sd[k] = sd["transformer_blocks.0." + k.split(".", 2)[2]]
    ref.load_state_dict(sd)
    ours = DiT(DiTConfig(in_channels=4, learn_sigma=True, sample_size=8, patch_size=2, hidden_size=32, depth=2,
                         num_heads=4, num_classes=10)).eval()
    ours.load_state_dict(state_dict_from_diffusers(sd), strict=True)
    back = state_dict_to_diffusers(ours.state_dict(), depth=2)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 250, 999])
    y = torch.tensor([1, 10, 7])  # 10 = the null class
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
        got = ours(x, t, class_labels=y)
    assert got.shape == (3, 8, 8, 8)
    assert (got - want).abs().max().item() <= 1e-5


def test_key_map_rejects_unshareable_embedders():
    sd = {"transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight": torch.zeros(2),
          "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight": torch.ones(2)}
    with pytest.raises(ValueError, match="shares one embedder"):
        state_dict_from_diffusers(sd)


def test_positions_match_original_dit_table_at_training_size():
    # original DiT / MAE: grid = meshgrid(w, h); first half encodes the column coordinate
    dim, n = 16, 4
    emb = pos_embed_2d(dim, n, n, base=n)
    row, col = 2, 3
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                        torch.sin(row * omega), torch.cos(row * omega)]).float()
    assert torch.allclose(emb[row * n + col], expect)
    # interpolate mode spreads a larger grid over the training range; extend keeps unit spacing
    assert torch.allclose(pos_embed_2d(dim, 8, 8, base=4)[2 * 8 + 2], emb[1 * n + 1])
    assert torch.allclose(pos_embed_2d(dim, 8, 8, base=4, mode="extend")[1 * 8 + 1], emb[1 * n + 1])


def test_blocks_are_identity_at_init_and_output_zero():
    torch.manual_seed(0)
    model = DiT(PRESETS["tiny-text"])
    h = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    ctx = torch.randn(2, 3, 32)
    for block in model.transformer_blocks:
        assert torch.equal(block(h, c, ctx), h)
    out = model(torch.randn(2, 4, 8, 8), 10, ctx)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (16, 16), (6, 10)])
def test_shapes_nonsquare_and_larger(hw):
    torch.manual_seed(0)
    model = DiT(PRESETS["tiny"]).eval()
    _randomise(model)
    x = torch.randn(2, 4, *hw)
    with torch.no_grad():
        out = model(x, 5, class_labels=torch.tensor([0, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_learn_sigma_doubles_output_and_presets_have_paper_shapes():
    assert PRESETS["DiT-XL/2"].out_channels == 8
    cfg = PRESETS["DiT-S/8"]
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (384, 12, 6, 8)
    with torch.device("meta"):
        n = sum(p.numel() for p in DiT(PRESETS["DiT-XL/2"]).parameters())
    assert abs(n / 1e6 - 675) < 5  # the paper's 675M parameters


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = DiT(dataclasses.replace(PRESETS["tiny-text"], num_classes=5))
    _randomise(model)  # zero-initialised gates would otherwise block gradients to the inner layers
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 3, 32),
                class_labels=torch.tensor([1, 5]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_context_acts_only_through_cross_attention():
    torch.manual_seed(0)
    model = DiT(PRESETS["tiny-text"]).eval()
    _randomise(model)
    x = torch.randn(2, 4, 8, 8)
    c1, c2 = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        assert (model(x, 5, c1) - model(x, 5, c2)).abs().max() > 1e-4
        for block in model.transformer_blocks:
            block.attn2.to_k.weight.zero_()
            block.attn2.to_k.bias.zero_()
            block.attn2.to_v.weight.zero_()
            block.attn2.to_v.bias.zero_()
        assert torch.equal(model(x, 5, c1), model(x, 5, c2))


def test_bad_inputs():
    model = DiT(PRESETS["tiny"])
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 4, 7, 8), 1, class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(1, 4, 8, 8), 1)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(torch.randn(1, 4, 8, 8), 1, class_labels=torch.tensor([11]))
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(hidden_size=30, num_heads=4)
