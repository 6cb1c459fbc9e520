"""Stage-2 networks: the SD-compatible UNet and DiT (see docs/denoisers.md)."""
from ldmkit.denoisers.dit import DiT, DiTConfig
from ldmkit.denoisers.dit import PRESETS as DIT_PRESETS
from ldmkit.denoisers.unet import PRESETS as UNET_PRESETS
from ldmkit.denoisers.unet import UNet, UNetConfig

__all__ = ["DIT_PRESETS", "DiT", "DiTConfig", "UNET_PRESETS", "UNet", "UNetConfig"]
