"""Stage 1: the perceptual autoencoder (KL or VQ bottleneck), its losses and CLI commands.

See docs/autoencoder.md. `Autoencoder`, `AutoencoderConfig` and `PRESETS` live in
`model.py`; the bottlenecks in `bottlenecks.py`; LPIPS / PatchGAN / the combined
loss in `losses.py`; its training method in `ldmkit.training.methods.autoencoder`.
"""

__all__ = ["PRESETS", "Autoencoder", "AutoencoderConfig"]


def __getattr__(name):  # lazy, so `ldm --help` does not import torch
    if name in __all__:
        from ldmkit.autoencoder import model

        return getattr(model, name)
    raise AttributeError(f"module 'ldmkit.autoencoder' has no attribute {name!r}")
