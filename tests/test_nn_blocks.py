"""Shared blocks equal diffusers' blocks on identical weights (same names, same numbers)."""
import pytest
import torch

from ldmkit.nn import (
    Attention,
    AttentionBlock2D,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    timestep_embedding,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention as DAttention  # noqa: E402
from diffusers.models.embeddings import TimestepEmbedding as DTimestepEmbedding  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402
from diffusers.models.resnet import Downsample2D as DDownsample2D  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D as DResnetBlock2D  # noqa: E402
from diffusers.models.upsampling import Upsample2D as DUpsample2D  # noqa: E402

TOL = 1e-5


def _copy(dst, src):
    dst.load_state_dict(src.state_dict(), strict=True)


@pytest.mark.parametrize("norm", ["default", "scale_shift"])
@pytest.mark.parametrize("cin,cout", [(32, 32), (32, 64)])
def test_resnet_block_matches_diffusers(norm, cin, cout):
    torch.manual_seed(0)
    ref = DResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=16, groups=8, eps=1e-5,
                         time_embedding_norm=norm).eval()
    ours = ResnetBlock2D(cin, cout, temb_channels=16, groups=8, eps=1e-5, time_embedding_norm=norm).eval()
    _copy(ours, ref)
    x, temb = torch.randn(2, cin, 9, 7), torch.randn(2, 16)
    assert (ours(x, temb) - ref(x, temb)).abs().max() < TOL


def test_resnet_block_without_time_embedding():
    torch.manual_seed(0)
    ref = DResnetBlock2D(in_channels=32, out_channels=16, temb_channels=None, groups=8).eval()
    ours = ResnetBlock2D(32, 16, temb_channels=None, groups=8).eval()
    _copy(ours, ref)
    x = torch.randn(2, 32, 8, 8)
    assert (ours(x) - ref(x, None)).abs().max() < TOL


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample_matches_diffusers(padding):
    torch.manual_seed(0)
    ref = DDownsample2D(16, use_conv=True, out_channels=16, padding=padding, name="op")  # as in the UNet and VAE
    ours = Downsample2D(16, padding=padding)
    _copy(ours, ref)
    x = torch.randn(2, 16, 10, 10)
    assert (ours(x) - ref(x)).abs().max() < TOL


def test_upsample_matches_diffusers_with_output_size():
    torch.manual_seed(0)
    ref = DUpsample2D(16, use_conv=True, out_channels=16)
    ours = Upsample2D(16)
    _copy(ours, ref)
    x = torch.randn(2, 16, 5, 4)
    assert (ours(x) - ref(x)).abs().max() < TOL
    assert (ours(x, output_size=(11, 9)) - ref(x, output_size=(11, 9))).abs().max() < TOL
    assert ours(x, output_size=(11, 9)).shape[-2:] == (11, 9)


@pytest.mark.parametrize("cross", [None, 24])
def test_attention_matches_diffusers(cross):
    torch.manual_seed(0)
    ref = DAttention(query_dim=32, cross_attention_dim=cross, heads=4, dim_head=8, bias=False).eval()
    ours = Attention(32, cross_attention_dim=cross, heads=4, dim_head=8).eval()
    _copy(ours, ref)
    x = torch.randn(2, 10, 32)
    ctx = torch.randn(2, 7, cross) if cross else None
    assert (ours(x, ctx) - ref(x, encoder_hidden_states=ctx)).abs().max() < TOL


def test_attention_mask_ignores_masked_tokens():
    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    x, ctx = torch.randn(1, 5, 16), torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])
    changed = ctx.clone()
    changed[:, 3:] = torch.randn(1, 3, 8)
    assert torch.allclose(attn(x, ctx, mask), attn(x, changed, mask), atol=1e-6)
    assert not torch.allclose(attn(x, ctx), attn(x, changed), atol=1e-4)
    with pytest.raises(ValueError, match="mask shape"):
        attn(x, ctx, mask[:, :4])


def test_vae_attention_block_matches_diffusers():
    torch.manual_seed(0)
    ref = DAttention(query_dim=32, heads=1, dim_head=32, rescale_output_factor=1.0, eps=1e-6,
                     norm_num_groups=8, spatial_norm_dim=None, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    ours = AttentionBlock2D(32, groups=8, eps=1e-6).eval()
    _copy(ours, ref)
    x = torch.randn(2, 32, 6, 5)
    assert (ours(x) - ref(x)).abs().max() < TOL


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 32), (False, 1, 32), (True, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert (timestep_embedding(t, dim, flip, shift) - ref).abs().max() < TOL
    with pytest.raises(ValueError):
        timestep_embedding(torch.zeros(2, 2), dim)


def test_timestep_mlp_matches_diffusers():
    torch.manual_seed(0)
    ref = DTimestepEmbedding(32, 64)
    ours = TimestepEmbedding(32, 64)
    _copy(ours, ref)
    e = torch.randn(3, 32)
    assert (ours(e) - ref(e)).abs().max() < TOL


def _plain_geglu(module, x):
    hidden, gate = module.proj(x).chunk(2, dim=-1)
    return hidden * torch.nn.functional.gelu(gate)


@pytest.mark.parametrize("bias", [True, False])
def test_geglu_training_path_matches_the_plain_math(bias):
    """With gradients on, GEGLU runs its own autograd function (two GEMMs into contiguous halves, a
    hand-written backward); output and every gradient equal autograd over the chunked projection."""
    from ldmkit.nn.transformer import GEGLU

    torch.manual_seed(0)
    geglu = GEGLU(24, 40, bias=bias)
    x = torch.randn(3, 7, 24, requires_grad=True)
    params = [x, *geglu.parameters()]
    out = geglu(x)
    assert out.grad_fn is not None and "GEGLU" in type(out.grad_fn).__name__  # the custom path ran
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad_out)
    want_out = _plain_geglu(geglu, x)
    want = torch.autograd.grad(want_out, params, grad_out)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # a frozen input (the first layer of a block fed by data) needs no input gradient
    frozen = torch.randn(3, 7, 24)
    torch.autograd.grad(geglu(frozen).sum(), list(geglu.parameters()))
    with torch.no_grad():  # inference takes the plain path, the same numbers
        torch.testing.assert_close(geglu(x), want_out.detach(), rtol=1e-6, atol=1e-6)


def test_geglu_training_path_under_bf16_autocast():
    """Under autocast the projections run in bf16 like nn.Linear's; gradients come back in the
    parameters' dtype and equal autograd's over the plain module to bf16 rounding."""
    from ldmkit.nn.transformer import GEGLU

    torch.manual_seed(1)
    geglu = GEGLU(32, 64)
    x = torch.randn(2, 9, 32, requires_grad=True)
    params = [x, *geglu.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = geglu(x)
        want_out = _plain_geglu(geglu, x)
    assert out.dtype == want_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want_out)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad_out)
    want = torch.autograd.grad(want_out, params, grad_out)
    for g, w, p in zip(got, want, params):
        assert g.dtype == p.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)
