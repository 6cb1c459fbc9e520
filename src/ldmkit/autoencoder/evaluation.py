"""Stage-1 measurements: the latent scaling factor (what stage 2 multiplies latents by) and
held-out reconstruction quality (PSNR, SSIM, LPIPS, codebook usage for VQ)."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from ldmkit.autoencoder.model import Autoencoder


def image_batch(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in indices])


@torch.no_grad()
def latent_statistics(model: Autoencoder, dataset, num_samples: int = 256, batch_size: int = 32,
                      seed: int = 0, device=None) -> dict:
    """Mean and std of the latents over the first `num_samples` images of `dataset`
    (posterior samples for KL, pre-quantisation latents for VQ).

    Returns {"shift_factor": mean, "scaling_factor": 1 / std, "std", "mean", "num_samples"}:
    (z - shift_factor) * scaling_factor then has zero mean and unit variance.
    """
    device = device or next(model.parameters()).device
    n = min(num_samples, len(dataset))
    if n < 1:
        raise ValueError("latent_statistics needs at least one image")
    g = torch.Generator(device=device).manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    model.eval()
    for start in range(0, n, batch_size):
        x = image_batch(dataset, range(start, min(n, start + batch_size))).to(device)
        z = model.encode(x).sample(g).double()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean ** 2, 1e-24))
    return {"shift_factor": mean, "scaling_factor": 1.0 / std, "mean": mean, "std": std, "num_samples": n}


@torch.no_grad()
def evaluate(model: Autoencoder, dataset, num_images: int | None = None, batch_size: int = 32, lpips=None,
             device=None) -> dict:
    """Held-out reconstruction metrics: PSNR / SSIM on [0, 1] images, LPIPS when given,
    codebook usage and perplexity over all held-out codes for VQ."""
    from ldmkit.metrics.reconstruction import lpips as lpips_fn
    from ldmkit.metrics.reconstruction import psnr, ssim, summarize, to_unit

    device = device or next(model.parameters()).device
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    model.eval()
    vals = {"psnr": [], "ssim": [], "lpips": []}
    counts = torch.zeros(model.config.num_codes, device=device) if model.config.kind == "vq" else None
    for start in range(0, n, batch_size):
        x = image_batch(dataset, range(start, min(n, start + batch_size))).to(device)
        z = model.encode(x).mode()
        if counts is not None:
            _, _, info = model.quantize(z)
            counts += torch.bincount(info["indices"].flatten(), minlength=counts.numel()).float()
        x_rec = model.decode(z).float().clamp(-1, 1)
        vals["psnr"] += psnr(to_unit(x), to_unit(x_rec)).tolist()
        vals["ssim"] += ssim(to_unit(x), to_unit(x_rec)).tolist() if min(x.shape[-2:]) >= 11 else []
        if lpips is not None:
            rgb = (lambda t: t if t.shape[1] == 3 else t.expand(-1, 3, -1, -1))
            vals["lpips"] += lpips_fn(lpips, rgb(x), rgb(x_rec)).tolist()
    out = {"num_images": n, "psnr": summarize(vals["psnr"]), "ssim": summarize(vals["ssim"]),
           "lpips": summarize(vals["lpips"]) if lpips is not None else "unavailable (no VGG16 weights)"}
    if counts is not None:
        p = counts / counts.sum()
        out["codebook"] = {"num_codes": int(counts.numel()), "used": int((counts > 0).sum()),
                           "usage": float((counts > 0).float().mean()),
                           "perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))}
    return out


def update_scaling_factor(folder: str | Path, dataset, num_samples: int = 256, seed: int = 0,
                          device: str | torch.device = "cpu") -> dict:
    """`ldm ae-stats`: recompute the latent statistics of a component folder and store them in its config.json."""
    from ldmkit.io.format import load_component
    from ldmkit.io.files import read_json, write_json

    folder = Path(folder)
    model = load_component(folder, device=device)
    if not isinstance(model, Autoencoder):
        raise ValueError(f"{folder} holds a {type(model).__name__}, not an autoencoder")
    model.config = replace(model.config, scaling_factor=1.0, shift_factor=0.0)
    stats = latent_statistics(model, dataset, num_samples, seed=seed)
    meta = read_json(folder / "config.json")
    meta["config"]["scaling_factor"] = stats["scaling_factor"]
    meta["config"]["shift_factor"] = stats["shift_factor"]
    write_json(folder / "config.json", meta)
    return stats
