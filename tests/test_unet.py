"""UNet: parity with diffusers' UNet2DConditionModel (identity key map), shapes, gradients,
and the cross-attention-only path of the context."""

import dataclasses

import pytest
import torch

from ldmkit.denoisers.unet import PRESETS, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")


def _diffusers_unet(**kw):
    base = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=24,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    base.update(kw)
    return diffusers.UNet2DConditionModel(**base)


def _ours_from(ref):
    rc = ref.config
    cfg = UNetConfig(
        in_channels=rc.in_channels, out_channels=rc.out_channels, block_out_channels=tuple(rc.block_out_channels),
        down_block_types=tuple(rc.down_block_types), up_block_types=tuple(rc.up_block_types),
        mid_block_type=rc.mid_block_type, layers_per_block=rc.layers_per_block,
        attention_head_dim=rc.attention_head_dim, transformer_layers_per_block=rc.transformer_layers_per_block,
        cross_attention_dim=rc.cross_attention_dim, use_linear_projection=rc.use_linear_projection,
        upcast_attention=rc.upcast_attention, norm_num_groups=rc.norm_num_groups, norm_eps=rc.norm_eps,
        resnet_time_scale_shift=rc.resnet_time_scale_shift, num_class_embeds=rc.num_class_embeds,
        only_cross_attention=rc.only_cross_attention, flip_sin_to_cos=rc.flip_sin_to_cos, freq_shift=rc.freq_shift, sample_size=rc.sample_size,
    )
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # identity key map
    return ours


def _randomise(model):
    # diffusers zero-initialises nothing here, but make every weight (biases, norms) non-trivial
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


CASES = {
    "sd1-conv-heads8": dict(),
    "sd2-linear-perlevel-upcast": dict(use_linear_projection=True, attention_head_dim=(2, 4, 4),
                                       upcast_attention=True),
    "class-embedding": dict(num_class_embeds=10),
    "inpaint-9ch": dict(in_channels=9),
    "x4-upscaler-style": dict(in_channels=7, num_class_embeds=1000, use_linear_projection=True,
                              only_cross_attention=(True, False, False),
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
    "scale-shift-2layers": dict(resnet_time_scale_shift="scale_shift", transformer_layers_per_block=(1, 2, 1),
                                layers_per_block=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name):
    torch.manual_seed(0)
    ref = _diffusers_unet(**CASES[name]).eval()
    _randomise(ref)
    ours = _ours_from(ref)
    b = 3
    x = torch.randn(b, ref.config.in_channels, 8, 8)
    t = torch.tensor([1.0, 500.0, 999.0])
    ctx = torch.randn(b, 5, 24)
    labels = torch.tensor([0, 3, 9]) if ref.config.num_class_embeds else None
    if ref.config.only_cross_attention is not False:
        assert ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.in_features == 24
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        got = ours(x, t, ctx, class_labels=labels)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_parity_with_mask_and_odd_size():
    torch.manual_seed(1)
    ref = _diffusers_unet().eval()
    _randomise(ref)
    ours = _ours_from(ref)
    x = torch.randn(2, 4, 10, 6)  # not a multiple of 2**levels in width: upsample to skip size
    ctx = torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        want = ref(x, 10, encoder_hidden_states=ctx, encoder_attention_mask=mask.long()).sample
        got = ours(x, 10, ctx, context_mask=mask)
    assert (got - want).abs().max().item() <= 1e-5


def test_preset_sd15_and_sd21_match_diffusers_key_shapes():
    # build on the meta device: no memory, only shapes
    for name, kw in {"sd15": dict(attention_head_dim=8, cross_attention_dim=768),
                     "sd21": dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                                  use_linear_projection=True, upcast_attention=True)}.items():
        with torch.device("meta"):
            ref = diffusers.UNet2DConditionModel(**kw)
            ours = UNet(PRESETS[name])
        want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert got == want, name
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())


def _tiny(**kw):
    return UNet(dataclasses.replace(PRESETS["tiny"], **kw))


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (16, 16), (7, 9)])
def test_shapes_nonsquare_and_larger(hw):
    torch.manual_seed(0)
    model = _tiny().eval()
    x = torch.randn(2, 4, *hw)
    with torch.no_grad():
        out = model(x, torch.tensor(3), torch.randn(2, 3, 32))
    assert out.shape == x.shape


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = _tiny(num_class_embeds=5, in_channels=9)
    out = model(torch.randn(2, 9, 8, 8), torch.tensor([3, 700]), torch.randn(2, 4, 32),
                class_labels=torch.tensor([1, 4]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_context_acts_only_through_cross_attention():
    torch.manual_seed(0)
    model = _tiny().eval()
    x = torch.randn(2, 4, 8, 8)
    c1, c2 = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        assert (model(x, 5, c1) - model(x, 5, c2)).abs().max() > 1e-4
        for name, module in model.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.zero_()
                module.to_v.weight.zero_()
        assert torch.allclose(model(x, 5, c1), model(x, 5, c2), atol=0, rtol=0)


def test_bad_inputs_raise_clear_errors():
    model = _tiny()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="context"):
        model(x, 1)
    with pytest.raises(ValueError, match="32"):
        model(x, 1, torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        model(torch.randn(2, 3, 8, 8), 1, torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="t has shape"):
        model(x, torch.tensor([1, 2, 3]), torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="class_labels"):
        _tiny(num_class_embeds=3)(x, 1, torch.randn(2, 3, 32), class_labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="heads"):
        UNetConfig(block_out_channels=(32, 64), attention_head_dim=5, norm_num_groups=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_config_roundtrip_through_json_lists():
    import json
    cfg = PRESETS["sd21"]
    again = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"nope": 1})
