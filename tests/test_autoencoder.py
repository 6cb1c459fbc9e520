"""Stage-1 autoencoder: shapes, diffusers parity, bottlenecks, losses, save/load."""
import math
import sys
import types
import warnings

import pytest
import torch

from ldmkit.autoencoder.bottlenecks import DiagonalGaussian, VectorQuantizer
from ldmkit.autoencoder.losses import (LPIPS, AutoencoderLoss, LossConfig, PatchDiscriminator, VGG16Features,
                                       adaptive_weight, d_loss_hinge, d_loss_nonsaturating, lpips_heads_path)
from ldmkit.autoencoder.model import PRESETS, Autoencoder, AutoencoderConfig


def tiny(kind="kl", ch_mult=(1, 2, 2), **kw):
    return AutoencoderConfig(kind=kind, channels=8, ch_mult=ch_mult, num_res_blocks=1, latent_channels=4,
                             norm_groups=4, num_codes=16, **kw)


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("f", [1, 2, 4, 8, 16])
def test_shapes_for_every_downsample_factor(kind, f):
    torch.manual_seed(0)
    m = int(math.log2(f))
    model = Autoencoder(tiny(kind, ch_mult=(1,) * (m + 1)))
    assert model.downsample_factor == f and model.latent_channels == 4
    x = torch.randn(2, 3, 32, 32)
    post = model.encode(x)
    assert post.mean.shape == (2, 4, 32 // f, 32 // f)
    assert model.decode(post.sample()).shape == x.shape
    x_rec, aux = model(x)
    assert x_rec.shape == x.shape
    assert ("kl" in aux) == (kind == "kl") and ("vq_loss" in aux) == (kind == "vq")


def test_presets_and_bad_input():
    assert PRESETS["kl-f8"].downsample_factor == 8 and PRESETS["kl-f8"].latent_channels == 4
    assert PRESETS["kl-f4"].downsample_factor == 4 and PRESETS["vq-f4"].kind == "vq"
    assert PRESETS["vq-f8"].downsample_factor == 8
    for name in ("tiny-kl-f4", "tiny-vq-f4"):
        assert PRESETS[name].downsample_factor == 4
    with pytest.raises(ValueError, match="unknown autoencoder preset 'nope'"):
        Autoencoder.from_preset("nope")
    with pytest.raises(ValueError, match="kind='ae'"):
        AutoencoderConfig(kind="ae")
    with pytest.raises(ValueError, match=r"ch_mult=.*1\.\.6"):
        AutoencoderConfig(ch_mult=(1,) * 7)
    model = Autoencoder(tiny())
    with pytest.raises(ValueError, match="divisible by the downsample factor 4"):
        model.encode(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"expected latents \[B, 4"):
        model.decode(torch.randn(1, 3, 8, 8))


def test_encode_decode_latents_apply_scale_and_shift():
    torch.manual_seed(0)
    model = Autoencoder(tiny(scaling_factor=0.5, shift_factor=0.25)).eval()
    x = torch.randn(1, 3, 16, 16)
    z = model.encode(x).mode()
    lat = model.encode_latents(x, sample=False)
    assert torch.allclose(lat, (z - 0.25) * 0.5)
    assert torch.allclose(model.decode_latents(lat), model.decode(z), atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.encode_latents(x, generator=g1), model.encode_latents(x, generator=g2))


def test_diffusers_autoencoderkl_parity():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=2,
        latent_channels=4, norm_num_groups=8, sample_size=32).eval()
    ours = Autoencoder(AutoencoderConfig(channels=16, ch_mult=(1, 2, 2), num_res_blocks=2, latent_channels=4,
                                         norm_groups=8)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # identity key map
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        p_ref, p_ours = ref.encode(x).latent_dist, ours.encode(x)
        assert torch.allclose(p_ref.mean, p_ours.mean, atol=1e-5)
        assert torch.allclose(p_ref.logvar, p_ours.logvar, atol=1e-5)
        z = p_ref.mean
        assert torch.allclose(ref.decode(z).sample, ours.decode(z), atol=1e-5)


def test_diffusers_vqmodel_keys_load():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, vq_embed_dim=4, num_vq_embeddings=16, norm_num_groups=8, sample_size=16).eval()
    ours = Autoencoder(AutoencoderConfig(kind="vq", channels=16, ch_mult=(1, 2), num_res_blocks=1,
                                         latent_channels=4, norm_groups=8, num_codes=16)).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert set(missing) == {"quantize.code_age"} and not unexpected  # our restart bookkeeping only
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        h = ref.encode(x).latents
        assert torch.allclose(h, ours.encode(x).mean, atol=1e-5)
        assert torch.allclose(ref.decode(h).sample, ours.decode(h), atol=1e-5)


def test_kl_matches_closed_form():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    post = DiagonalGaussian(mean, logvar)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(post.kl(), ref, atol=1e-4)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)).kl(), torch.zeros(1))
    g = torch.Generator().manual_seed(0)
    s = DiagonalGaussian(torch.full((1, 1, 200, 200), 2.0), torch.full((1, 1, 200, 200), math.log(0.25))).sample(g)
    assert abs(s.mean().item() - 2.0) < 0.01 and abs(s.std().item() - 0.5) < 0.01
    det = DiagonalGaussian(mean)
    assert torch.equal(det.sample(), mean) and torch.equal(det.std, torch.zeros_like(mean))
    assert torch.equal(det.kl(), torch.zeros(3))


def test_vq_straight_through_gradient_codebook_loss_and_usage():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[i, -i] for i in range(8)], dtype=torch.float))
    # Latents near codes 1, 1, 3, 5 -> indices known, 3 of 8 codes used.
    z = torch.tensor([[1.1, -0.9], [0.8, -1.2], [3.1, -3.0], [5.0, -4.9]]).t().reshape(1, 2, 2, 2)
    z = z.clone().requires_grad_(True)
    z_q, loss, info = vq(z)
    assert info["indices"].flatten().tolist() == [1, 1, 3, 5]
    assert torch.allclose(z_q, vq.embedding.weight[info["indices"].flatten()].t().reshape(1, 2, 2, 2))
    assert info["usage"].item() == pytest.approx(3 / 8)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert info["perplexity"].item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-5)
    # loss = ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (means)
    mse = (z.detach() - z_q.detach()).pow(2).mean()
    assert loss.item() == pytest.approx(1.25 * mse.item(), rel=1e-5)
    # Straight-through: d(sum z_q)/dz = 1 from the decoder side, plus the commitment gradient.
    z_q.sum().backward(retain_graph=True)
    assert torch.allclose(z.grad, torch.ones_like(z))
    z.grad = None
    vq.zero_grad()
    loss.backward()
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad[[1, 3, 5]].abs().sum() > 0
    assert vq.embedding.weight.grad[[0, 2, 4, 6, 7]].abs().sum() == 0


def test_vq_ema_updates_restart_and_l2():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, use_ema=True, ema_decay=0.5, restart_after=2)
    assert not vq.embedding.weight.requires_grad
    z = torch.tensor([3.0, 3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2).contiguous()
    before = vq.embedding.weight.clone()
    vq.train()
    _, loss, info = vq(z)
    chosen = info["indices"].flatten()[0].item()
    after = vq.embedding.weight
    # The chosen code moved towards the latent, the others did not change direction.
    assert (after[chosen] - torch.tensor([3.0, 3.0])).norm() < (before[chosen] - torch.tensor([3.0, 3.0])).norm()
    vq(z)
    # Three of four codes unused for 2 steps -> restarted on batch latents (3, 3).
    assert torch.allclose(vq.embedding.weight, torch.full((4, 2), 3.0), atol=0.5)
    assert (vq.code_age == 0).all()
    with torch.no_grad():  # no update outside training
        w = vq.embedding.weight.clone()
        vq(torch.randn(1, 2, 2, 2))
        assert torch.equal(w, vq.embedding.weight)
    cos = VectorQuantizer(4, 2, l2_normalize=True)
    z_q, _, _ = cos(torch.randn(2, 2, 3, 3) * 5)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    with pytest.raises(ValueError, match="num_codes=1"):
        VectorQuantizer(1, 2)


def test_vq_autoencoder_gradients_reach_encoder():
    torch.manual_seed(0)
    model = Autoencoder(tiny("vq"))
    x_rec, aux = model(torch.randn(2, 3, 16, 16))
    (x_rec.pow(2).mean() + aux["vq_loss"]).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert 0 < aux["usage"].item() <= 1 and aux["perplexity"].item() >= 1


def test_adaptive_weight_is_gradient_norm_ratio():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3)
    out = x @ w.t()
    rec, gan = out.pow(2).mean(), (3 * out).sin().mean()
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, w, retain_graph=True)[0]
    want = g_rec.norm() / (g_gan.norm() + 1e-4)
    got = adaptive_weight(rec, gan, w)
    assert not got.requires_grad and got.item() == pytest.approx(want.item(), rel=1e-6)
    # The clamp bounds the weight when the GAN gradient vanishes.
    assert adaptive_weight(rec, 0 * out.sum(), w).item() <= 1e4


def test_generator_and_discriminator_losses_logged_separately():
    torch.manual_seed(0)
    model = Autoencoder(tiny())
    crit = AutoencoderLoss(LossConfig(disc_start=2, disc_layers=2, disc_channels=8))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec, aux = model(x)
    loss, logs = crit.generator_loss(x, x_rec, aux, step=0, last_layer=model.last_layer)
    assert set(logs) == {"rec", "kl", "total"}  # before disc_start, no LPIPS network given
    kl_sum = aux["kl"].mean()  # KL summed over the latent, batch mean
    assert loss.item() == pytest.approx((logs["rec"] + 1e-6 * kl_sum / x[0].numel()).item(), rel=1e-5)
    assert logs["kl"].item() == pytest.approx(kl_sum.item() / aux["posterior"].mean[0].numel(), rel=1e-5)
    loss, logs = crit.generator_loss(x, x_rec, aux, step=2, last_layer=model.last_layer)
    assert {"g", "d_weight"} <= set(logs)
    loss.backward()
    assert all(p.grad is None for p in crit.discriminator.parameters())  # G step leaves D alone
    d, dlogs = crit.discriminator_loss(x, x_rec, step=2)
    d.backward()
    assert crit.discriminator.main[0].weight.grad is not None and "logits_real" in dlogs
    with pytest.raises(ValueError, match="discriminator inactive at step 1"):
        crit.discriminator_loss(x, x_rec, step=1)
    with pytest.raises(ValueError, match="disc_loss='wgan'"):
        LossConfig(disc_loss="wgan")


def test_gan_losses_and_patchgan_shape():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert d_loss_hinge(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    sp = torch.nn.functional.softplus
    assert d_loss_nonsaturating(real, fake).item() == pytest.approx(0.5 * (sp(-real).mean() + sp(fake).mean()).item())
    for n, size in [(1, 14), (3, 2)]:  # 32 -> 16 (-> 8 -> 4) -> k4 s1 -> k4 s1
        d = PatchDiscriminator(3, 8, n_layers=n)
        assert d(torch.randn(1, 3, 32, 32)).shape == (1, 1, size, size)


def test_vgg16_layout_matches_torchvision_keys():
    keys = set(VGG16Features().state_dict())
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert keys == {f"features.{i}.{p}" for i in convs for p in ("weight", "bias")}


def test_lpips_matches_reference_package_with_random_backbone(monkeypatch):
    """Our LPIPS vs the `lpips` package on identical random VGG16 weights (torchvision faked)."""
    torch.manual_seed(0)
    ours = LPIPS()
    ours.load_heads()
    backbone = VGG16Features()
    ours.net.load_state_dict(backbone.state_dict())
    fake_models = types.ModuleType("torchvision.models")
    fake_models.vgg16 = lambda pretrained=False, **kw: types.SimpleNamespace(features=backbone.features)
    fake_tv = types.ModuleType("torchvision")
    fake_tv.models = fake_models
    monkeypatch.setitem(sys.modules, "torchvision", fake_tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake_models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import lpips as lpips_pkg
            ref = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    except Exception as exc:  # pragma: no cover - depends on the installed lpips
        pytest.skip(f"lpips package not usable: {exc}")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours(x, y), ref(x, y), rtol=1e-4, atol=1e-6)
        assert torch.allclose(ours(x, x), torch.zeros(2, 1, 1, 1))
    # Frozen, but differentiable with respect to the input.
    y.requires_grad_(True)
    ours(x, y).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in ours.parameters())
    assert lpips_heads_path().name == "vgg.pth"


def test_lpips_unavailable_without_backbone(monkeypatch, tmp_path):
    monkeypatch.delenv("LDMKIT_VGG16_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.warns(UserWarning, match="LPIPS is unavailable"):
        assert LPIPS.from_pretrained() is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LPIPS.from_pretrained(tmp_path / "missing.pth")
    # A local file in torchvision's layout is picked up from the hub cache.
    (tmp_path / "checkpoints").mkdir()
    torch.save(VGG16Features().state_dict(), tmp_path / "checkpoints" / "vgg16-397923af.pth")
    assert isinstance(LPIPS.from_pretrained(), LPIPS)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    from ldmkit.io.format import load_component, save_component

    torch.manual_seed(0)
    model = Autoencoder(tiny(kind, scaling_factor=0.3, shift_factor=0.1)).eval()
    save_component(model, tmp_path / "ae")
    loaded = load_component(tmp_path / "ae")
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x).mode()), loaded.decode(loaded.encode(x).mode()))
