"""Building blocks shared by every network: resnet blocks, up/down sampling,
attention (self, cross, spatial) and timestep embeddings."""
from ldmkit.nn.attention import Attention, AttentionBlock2D
from ldmkit.nn.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from ldmkit.nn.embeddings import TimestepEmbedding, timestep_embedding

__all__ = [
    "Attention",
    "AttentionBlock2D",
    "Downsample2D",
    "ResnetBlock2D",
    "TimestepEmbedding",
    "Upsample2D",
    "timestep_embedding",
]
