"""PSNR / SSIM against closed forms and scikit-image on real photographs."""
import numpy as np
import pytest
import torch

from ldmkit.metrics.reconstruction import psnr, ssim, summarize, to_unit

skimage_data = pytest.importorskip("skimage.data")
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402
from skimage.filters import gaussian  # noqa: E402


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    a = a.astype(np.float64)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1                       # MSE 0.01 on range 2 -> 10 log10(4 / 0.01)
    y[1] += 0.2
    got = psnr(x, y, data_range=2.0)  # [-1, 1] images
    want = torch.tensor([10 * np.log10(4 / 0.01), 10 * np.log10(4 / 0.04)], dtype=torch.float32)
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("name", ["astronaut", "camera"])
def test_ssim_and_psnr_match_skimage_on_real_photo(name):
    img = getattr(skimage_data, name)()[100:228, 120:248]  # 128x128 crop of a real photograph
    rng = np.random.default_rng(0)
    blurred = gaussian(img, sigma=1.2, channel_axis=-1 if img.ndim == 3 else None, preserve_range=True)
    noisy = np.clip(blurred + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    kw = dict(data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    if img.ndim == 3:
        kw["channel_axis"] = 2
    ref = structural_similarity(img, noisy, **kw)
    got = ssim(_to_tensor(img), _to_tensor(noisy), data_range=255.0).item()
    assert 0.2 < ref < 0.95  # a non-trivial pair
    assert got == pytest.approx(ref, abs=1e-5)
    ref_psnr = peak_signal_noise_ratio(img, noisy, data_range=255)
    assert psnr(_to_tensor(img), _to_tensor(noisy), data_range=255.0).item() == pytest.approx(ref_psnr, abs=1e-4)


def test_ssim_identity_range_invariance_and_errors():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    y = (x + 0.15 * torch.randn_like(x)).clamp(0, 1)
    # The same pair scaled to [0, 255] with data_range 255 gives the same SSIM.
    assert torch.allclose(ssim(x, y), ssim(255 * x, 255 * y, data_range=255.0), atol=1e-5)
    assert (ssim(x, y) < 0.9).all()
    with pytest.raises(ValueError, match="equal shape"):
        ssim(x, y[:, :, :16])
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(x[:, :, :8, :8], y[:, :, :8, :8])


def test_summarize():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["n"] == 3 and s["stderr"] == pytest.approx(1 / np.sqrt(3))


def test_to_unit():
    assert torch.equal(to_unit(torch.tensor([-2.0, -1.0, 0.0, 1.0])), torch.tensor([0.0, 0.0, 0.5, 1.0]))
