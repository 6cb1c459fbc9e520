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


# --------------------------------------------------------------------------- ldmkit extensions
def _ext_pair():
    from ldmkit.denoisers.extensions import ExtendedUNet, ExtendedUNetConfig

    torch.manual_seed(0)
    base_cfg = dataclasses.replace(PRESETS["tiny"], cross_attention_dim=24)
    base = UNet(base_cfg)
    ext = ExtendedUNet(ExtendedUNetConfig(unet=base_cfg, position_features=True, context_adapter_layers=2,
                                          context_adapter_width=16, context_adapter_heads=2))
    ext.unet.load_state_dict(base.state_dict())
    return base_cfg, base, ext


def test_extensions_start_as_the_plain_unet_then_train():
    """position_features / context_adapter_layers wrap the UNet with parameters whose output projections
    start at zero: the extended UNet computes exactly what the plain one does until training moves them."""
    _, base, ext = _ext_pair()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        assert torch.equal(ext(x, torch.tensor([3, 700]), ctx, context_mask=mask),
                           base(x, torch.tensor([3, 700]), ctx, context_mask=mask))
    extra = sorted(set(ext.state_dict()) - {f"unet.{k}" for k in base.state_dict()})
    assert "position.conv_in.proj.weight" in extra and "context_adapter.proj_out.weight" in extra
    assert "position.down_blocks-0-attentions-0.proj.weight" in extra
    assert set(ext.unet.state_dict()) == set(base.state_dict())  # the UNet inside is diffusers' UNet
    opt = torch.optim.SGD(ext.parameters(), lr=0.1)
    for _ in range(2):  # after one step the zero projections are not zero: every parameter then learns
        opt.zero_grad()
        ext(x, torch.tensor([3, 700]), ctx, context_mask=mask).square().mean().backward()
        opt.step()
    dead = [n for n, p in ext.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead
    with torch.no_grad():  # and now the output differs from the plain UNet
        assert (ext(x, 5, ctx, context_mask=mask) - base(x, 5, ctx, context_mask=mask)).abs().max() > 1e-4


def test_copies_of_an_extended_unet_use_their_own_position_weights():
    """The position features reach the inner UNet through hooks: a deepcopy (the EMA, FSDP templates) must
    hook its own copies of the injection weights, not the original's."""
    import copy

    _, _, ext = _ext_pair()
    twin = copy.deepcopy(ext)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 24)
    with torch.no_grad():
        for p in twin.position.parameters():
            p.add_(0.5)
        assert not torch.equal(twin(x, 9, ctx), ext(x, 9, ctx))  # the copy's weights act in the copy...
        for p in ext.position.parameters():
            p.add_(0.5)
        torch.testing.assert_close(twin(x, 9, ctx), ext(x, 9, ctx))  # ...and the original's in the original


def test_context_adapter_ignores_masked_tokens_and_positions_work_at_any_size():
    _, _, ext = _ext_pair()
    with torch.no_grad():
        for p in ext.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        ext.eval()
        x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 24)
        mask = torch.tensor([[True] * 4 + [False] * 2])
        other = ctx.clone()
        other[:, 4:] = torch.randn(1, 2, 24)  # padding content must not matter
        torch.testing.assert_close(ext(x, 9, ctx, context_mask=mask), ext(x, 9, other, context_mask=mask))
        # coordinates are normalised: larger and non-square latents run
        for hw in ((16, 16), (12, 20)):
            assert ext(torch.randn(1, 4, *hw), 9, ctx, context_mask=mask).shape == (1, 4, *hw)
    from ldmkit.nn.embeddings import position_features
    f = position_features(4, 6)
    assert f.shape == (14, 4, 6) and f[0, 0, 0] == -1 and f[0, 0, -1] == 1 and f[1, -1, 0] == 1


def test_extensions_are_their_own_component_and_older_layouts_load(tmp_path):
    from ldmkit.denoisers.extensions import ExtendedUNet, ExtendedUNetConfig
    from ldmkit.io.diffusers_export import save_diffusers
    from ldmkit.io.format import WEIGHTS_FILE, load_component, save_component
    from ldmkit.io.files import save_tensors, write_json

    base_cfg, base, ext = _ext_pair()
    save_component(ext, tmp_path / "unet")
    again = load_component(tmp_path / "unet")
    assert isinstance(again, ExtendedUNet) and again.config == ext.config
    for k, v in ext.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    # a "unet" component written when the extensions lived inside the UNet (the bundled demo model was)
    old = {**base_cfg.to_dict(), "position_features": True, "context_adapter_layers": 2,
           "context_adapter_width": 16, "context_adapter_heads": 2}
    old_keys = {}
    for k, v in ext.state_dict().items():
        if k.startswith("unet."):
            old_keys[k.removeprefix("unet.")] = v
        elif k == "position.conv_in.proj.weight":
            old_keys["position_in.proj.weight"] = v
        elif k.startswith("position."):
            path, rest = k.removeprefix("position.").split(".", 1)
            old_keys[f"{path.replace('-', '.')}.position.{rest}"] = v
        else:
            old_keys[k] = v
    write_json(tmp_path / "old" / "config.json", {"type": "unet", "config": old})
    save_tensors(tmp_path / "old" / WEIGHTS_FILE, old_keys)
    legacy = load_component(tmp_path / "old")
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(legacy(x, 7, ctx), ext(x, 7, ctx), rtol=0, atol=0)
    # diffusers has no such UNet: the export refuses it by name
    with pytest.raises(ValueError, match="ExtendedUNet"):
        save_diffusers(tmp_path / "exported", {}, {"denoiser": ext})
    with pytest.raises(ValueError, match="heads"):
        ExtendedUNetConfig(unet=base_cfg, context_adapter_layers=1, context_adapter_width=30, context_adapter_heads=4)
    with pytest.raises(ValueError, match="cross-attention"):
        ExtendedUNetConfig(unet=dataclasses.replace(base_cfg, mid_block_type=None,
                                                    down_block_types=("DownBlock2D", "DownBlock2D"),
                                                    up_block_types=("UpBlock2D", "UpBlock2D")),
                           context_adapter_layers=1)


@pytest.mark.parametrize("name", ["sd1-conv-heads8", "sd2-linear-perlevel-upcast"])
def test_training_gradients_match_diffusers(name):
    """With gradients on, our training-time paths (the GEGLU autograd function, the NCHW-contiguous
    spatial-transformer output) give diffusers' loss and parameter gradients on the same weights."""
    torch.manual_seed(2)
    ref = _diffusers_unet(**CASES[name]).train()
    _randomise(ref)
    ours = _ours_from(ref).train()
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 24)
    t = torch.tensor([1.0, 500.0, 999.0])
    target = torch.randn(3, 4, 8, 8)
    loss_ref = (ref(x, t, encoder_hidden_states=ctx).sample - target).square().mean()
    loss_ours = (ours(x, t, ctx) - target).square().mean()
    loss_ref.backward()
    loss_ours.backward()
    assert abs(loss_ours.item() - loss_ref.item()) <= 1e-6
    theirs = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[key].grad, rtol=1e-4, atol=1e-6, msg=key)


def test_spatial_transformer_hands_back_nchw_memory():
    """The spatial transformer's output is NCHW in memory as well as in shape: a channels-last view
    would turn every later convolution channels-last (a weight copy per conv)."""
    for linear in (False, True):
        cfg = dataclasses.replace(PRESETS["tiny"], use_linear_projection=linear)
        block = UNet(cfg).down_blocks[0].attentions[0]
        out = block(torch.randn(2, 32, 8, 8), torch.randn(2, 3, 32))
        assert out.is_contiguous()
