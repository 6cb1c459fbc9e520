"""Conditioning: tau_theta(y) for text, class labels and spatial inputs (see base.py for the interface)."""
from ldmkit.conditioning.base import Conditioner, Conditioning
from ldmkit.conditioning.labels import ClassConditioner, ClassConfig
from ldmkit.conditioning.spatial import SpatialConditioner, SpatialConfig
from ldmkit.conditioning.text import (BertTextEncoder, CLIPTextEncoder, PretrainedTextConfig, TransformerTextConfig,
                                      TransformerTextEncoder, build_word_tokenizer)

__all__ = [
    "BertTextEncoder", "CLIPTextEncoder", "ClassConditioner", "ClassConfig", "Conditioner", "Conditioning",
    "PretrainedTextConfig", "SpatialConditioner", "SpatialConfig", "TransformerTextConfig",
    "TransformerTextEncoder", "build_word_tokenizer",
]
