"""Class-label conditioning with a null class for classifier-free guidance.

Labels 0..num_classes-1 are the classes and ``num_classes`` is the null class. Two ways to reach
the denoiser:

- ``context_dim=None``: only ``class_labels`` [B] are returned; the denoiser embeds them
  (DiT's ``class_embedding`` has num_classes + 1 rows; a UNet needs ``num_class_embeds =
  num_classes + 1``) and adds them to the time embedding.
- ``context_dim=D``: a learned table (``embedding``, num_classes + 1 rows) gives a one-token
  context [B, 1, D] for cross-attention, as the LDM paper's class-conditional ImageNet model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldmkit.conditioning.base import Conditioner, Conditioning, check_batch


@dataclass(frozen=True)
class ClassConfig:
    num_classes: int
    context_dim: int | None = None
    class_names: tuple = ()  # optional names: encode() then also accepts them

    def __post_init__(self):
        from ldmkit.errors import check_int

        if isinstance(self.class_names, list):
            object.__setattr__(self, "class_names", tuple(self.class_names))
        check_int("num_classes", self.num_classes, 1, 1 << 24)
        check_int("context_dim", self.context_dim, 1, 65536, optional=True)
        if not isinstance(self.class_names, tuple) or not all(isinstance(n, str) for n in self.class_names):
            raise ValueError(f"class_names={self.class_names!r} must be a list of names")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 1")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")


class ClassConditioner(Conditioner):
    component_type = "class"

    def __init__(self, config: ClassConfig):
        super().__init__()
        self.config = config
        self.null_label = config.num_classes
        self.embedding = nn.Embedding(config.num_classes + 1, config.context_dim) if config.context_dim else None
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, std=0.02)

    @classmethod
    def from_component(cls, config: dict, folder) -> "ClassConditioner":
        from ldmkit.io.files import config_from_dict

        return cls(config_from_dict(ClassConfig, config))

    def _label(self, y) -> int:
        if isinstance(y, str):
            if y not in self.config.class_names:
                raise ValueError(f"unknown class name {y!r}; known: {list(self.config.class_names)}")
            return self.config.class_names.index(y)
        y = int(y)
        if not 0 <= y <= self.config.num_classes:
            raise ValueError(f"class label {y} is outside [0, {self.config.num_classes - 1}] "
                             f"(or {self.config.num_classes} for the null class)")
        return y

    def labels_to_conditioning(self, labels: torch.Tensor) -> Conditioning:
        if self.embedding is not None:
            labels = labels.to(self.embedding.weight.device)
            return Conditioning(context=self.embedding(labels)[:, None, :], class_labels=labels)
        return Conditioning(class_labels=labels)

    def encode(self, labels: list) -> Conditioning:
        labels = check_batch(labels, "class labels")
        return self.labels_to_conditioning(torch.tensor([self._label(y) for y in labels], dtype=torch.long))

    def null(self, batch_size: int) -> Conditioning:
        return self.labels_to_conditioning(torch.full((batch_size,), self.null_label, dtype=torch.long))
