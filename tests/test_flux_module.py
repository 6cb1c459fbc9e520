"""FLUX.1 transformer: parity with diffusers' FluxTransformer2DModel (identity key map, strict load), the
2x2 latent packing and position ids against FluxPipeline's helpers, the full-size presets' parameter names
and shapes on the meta device, the from-scratch initialisation and one-line errors for bad input."""

import dataclasses

import pytest
import torch

from ldmkit.denoisers.flux import (PRESETS, Flux, FluxConfig, image_ids, pack_latents, text_ids,
                                   unpack_latents)

diffusers = pytest.importorskip("diffusers")

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))


def _pair(guidance_embeds: bool):
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**TINY, guidance_embeds=guidance_embeds).eval()
    with torch.no_grad():  # move every parameter off its default (RMSNorm weights are all ones)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = Flux(FluxConfig(**TINY, guidance_embeds=guidance_embeds)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(b=2, h=8, w=6, n_txt=5):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(b, 16, h, w, generator=g)
    return dict(
        hidden_states=pack_latents(z),
        timestep=torch.tensor([0.9, 0.25])[:b],
        pooled_projections=torch.randn(b, 24, generator=g),
        encoder_hidden_states=torch.randn(b, n_txt, 32, generator=g),
        img_ids=image_ids(h // 2, w // 2),
        # text positions are zero in FLUX; nonzero ids here exercise every rotary axis on both streams
        txt_ids=torch.randint(0, 7, (n_txt, 3), generator=g).float(),
    )


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_parity_with_diffusers(guidance_embeds):
    ref, ours = _pair(guidance_embeds)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    x = _inputs()
    guidance = torch.tensor([3.5, 1.0]) if guidance_embeds else None
    with torch.no_grad():
        want = ref(**x, guidance=guidance).sample
        got = ours(**x, guidance=guidance)
    assert got.shape == want.shape == (2, 12, 64)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5, diff
    # a scalar timestep / guidance is broadcast over the batch
    with torch.no_grad():
        scalar = ours(**{**x, "timestep": torch.tensor(0.5)}, guidance=None if guidance is None else 2.0)
        batched = ours(**{**x, "timestep": torch.tensor([0.5, 0.5])},
                       guidance=None if guidance is None else torch.tensor([2.0, 2.0]))
    assert torch.equal(scalar, batched)
    # half precision: both models run the same kernels on the same layouts, so the outputs are identical
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    half = {k: v.to(torch.bfloat16) if k in ("hidden_states", "pooled_projections", "encoder_hidden_states") else v
            for k, v in x.items()}
    with torch.no_grad():
        assert torch.equal(ours(**half, guidance=guidance), ref(**half, guidance=guidance).sample)


def test_packing_and_ids_match_flux_pipeline():
    pipe = diffusers.FluxPipeline
    z = torch.randn(2, 16, 8, 6)
    packed = pack_latents(z)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(packed, pipe._pack_latents(z, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), z)
    # diffusers' unpack takes the pixel size and the VAE factor
    assert torch.equal(unpack_latents(packed, 8, 6), pipe._unpack_latents(packed, 64, 48, 8))
    assert torch.equal(image_ids(4, 3), pipe._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))
    assert torch.equal(text_ids(5), torch.zeros(5, 3))
    for bad in (torch.zeros(1, 16, 7, 6), torch.zeros(16, 8, 6)):
        with pytest.raises(ValueError, match="cannot be packed"):
            pack_latents(bad)
    with pytest.raises(ValueError, match="cannot be unpacked"):
        unpack_latents(packed, 8, 8)


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_full_size_presets_match_diffusers_on_meta(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(**{k: v for k, v in cfg.to_dict().items()})
        ours = Flux(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert count == {"flux-dev": 11_901_408_320, "flux-schnell": 11_891_178_560}[name]


def test_tiny_presets_and_config_round_trip():
    assert PRESETS["flux-tiny"].guidance_embeds and not PRESETS["flux-tiny-schnell"].guidance_embeds
    cfg = PRESETS["flux-tiny"]
    d = cfg.to_dict()
    assert d["out_channels"] == 64
    assert FluxConfig.from_dict({**d, "axes_dims_rope": list(d["axes_dims_rope"])}) == cfg  # JSON lists
    assert FluxConfig.from_dict({**d, "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1"}) == cfg
    with pytest.raises(ValueError, match="FluxConfig: unknown config keys"):
        FluxConfig.from_dict({**d, "sample_size": 64})


@pytest.mark.parametrize("change, match", [
    (dict(axes_dims_rope=(4, 6, 8)), "must sum to attention_head_dim=16"),
    (dict(axes_dims_rope=(5, 5, 6)), "even numbers"),
    (dict(num_attention_heads=0), "num_attention_heads=0"),
    (dict(guidance_embeds="yes"), "guidance_embeds='yes'"),
])
def test_bad_configs_give_one_line_errors(change, match):
    with pytest.raises(ValueError, match=match) as e:
        dataclasses.replace(PRESETS["flux-tiny"], **change)
    assert "\n" not in str(e.value)


def test_fresh_model_predicts_zeros_and_trains():
    torch.manual_seed(0)
    model = Flux(PRESETS["flux-tiny"])
    x = _inputs()
    out = model(**x, guidance=torch.tensor([3.5, 3.5]))
    assert torch.equal(out, torch.zeros_like(out))  # AdaLN-Zero gates and a zero proj_out
    out.square().add(out).sum().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0
    # gradient checkpointing recomputes the same gradients
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(**x, guidance=torch.tensor([3.5, 3.5])).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_inputs_give_one_line_errors():
    dev, schnell = Flux(PRESETS["flux-tiny"]), Flux(PRESETS["flux-tiny-schnell"])
    x = _inputs()
    cases = [
        (dev, dict(guidance=None), "guidance is None"),
        (schnell, dict(guidance=torch.tensor([3.5, 3.5])), "no guidance embedding"),
        (dev, dict(hidden_states=torch.zeros(2, 12, 16)), "hidden_states has shape"),
        (dev, dict(encoder_hidden_states=torch.zeros(2, 5, 7)), "encoder_hidden_states has shape"),
        (dev, dict(pooled_projections=torch.zeros(2, 8)), "pooled_projections has shape"),
        (dev, dict(img_ids=image_ids(8, 6)), r"img_ids has shape \(48, 3\); expected \[12, 3\]"),
        (dev, dict(txt_ids=torch.zeros(1, 5, 3)), "txt_ids has shape"),
        (dev, dict(timestep=torch.zeros(3)), "timestep has shape"),
    ]
    for model, change, match in cases:
        kwargs = {"guidance": torch.tensor([3.5, 3.5]), **x, **change}
        with pytest.raises(ValueError, match=match) as e:
            model(**kwargs)
        assert "\n" not in str(e.value)
