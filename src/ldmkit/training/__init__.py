"""Training: one loop (`loop.py`) and the methods that plug into it (`methods/`).

    from ldmkit.training import LDM, LDMConfig, train
    train(LDM(LDMConfig(latents="runs/latents", autoencoder="runs/ae/autoencoder", out="runs/ldm")))
"""
from ldmkit.training.config import TrainConfig
from ldmkit.training.loop import Method, Trainer, TrainingDiverged, train
from ldmkit.training.methods import LDM, METHODS, AETrainConfig, AutoencoderMethod, LDMConfig

__all__ = ["AETrainConfig", "AutoencoderMethod", "LDM", "LDMConfig", "METHODS", "Method", "TrainConfig", "Trainer",
           "TrainingDiverged", "train"]
