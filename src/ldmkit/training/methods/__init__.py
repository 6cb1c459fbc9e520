"""Training methods: each says what a batch is, which parameters train and what the loss is; the one
loop (`training/loop.py`) does the rest. A new method is one module here and one line below."""
from ldmkit.training.methods.autoencoder import AETrainConfig, AutoencoderMethod
from ldmkit.training.methods.controlnet import ControlNetMethod, ControlTrainConfig
from ldmkit.training.methods.finetune import FineTune, FineTuneConfig
from ldmkit.training.methods.lcm import LCM, LCMConfig
from ldmkit.training.methods.tiny_decoder import TinyDecoderMethod, TinyTrainConfig
from ldmkit.training.methods.ldm import LDM, LDMConfig

# name -> (method class, config class); `ldm train --method NAME` builds its flags from the config
METHODS = {
    "ldm": (LDM, LDMConfig),
    "autoencoder": (AutoencoderMethod, AETrainConfig),
    "finetune": (FineTune, FineTuneConfig),
    "controlnet": (ControlNetMethod, ControlTrainConfig),
    "lcm": (LCM, LCMConfig),  # `ldm distill`
    "tiny-decoder": (TinyDecoderMethod, TinyTrainConfig),  # `ldm train-tiny-decoder`
}

__all__ = ["AETrainConfig", "AutoencoderMethod", "ControlNetMethod", "ControlTrainConfig", "FineTune", "FineTuneConfig", "LCM", "LCMConfig", "LDM", "LDMConfig", "METHODS", "TinyDecoderMethod",
           "TinyTrainConfig"]
