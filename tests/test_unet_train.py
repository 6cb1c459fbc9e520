"""A few optimisation steps: each backbone learns with each kind of conditioning (loss falls)."""

import dataclasses

import pytest
import torch

from ldmkit.conditioning import ClassConditioner, ClassConfig, SpatialConditioner, SpatialConfig, \
    TransformerTextEncoder
from ldmkit.denoisers.dit import PRESETS as DIT
from ldmkit.denoisers.dit import DiT
from ldmkit.denoisers.unet import PRESETS as UNET
from ldmkit.denoisers.unet import UNet


CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red square"]


def _fit(model, conditioner, conditions, steps=15, spatial=None):
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8)
    target = torch.randn(4, 4, 8, 8)
    t = torch.tensor([10, 200, 500, 900])
    params = [p for p in list(model.parameters()) + list(conditioner.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(steps):
        cond = conditioner.drop(conditioner.encode(conditions), 0.0)
        if spatial is not None:
            cond = cond.merge(spatial)
        loss = (model(cond.denoiser_input(x), t, **cond.denoiser_kwargs()) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_unet_text_trains_jointly():
    torch.manual_seed(0)
    enc = TransformerTextEncoder.from_captions(CAPTIONS, max_length=8, width=32, depth=1, heads=2)
    _fit(UNet(UNET["tiny"]), enc, CAPTIONS)


def test_unet_class_and_inpaint_concat_trains():
    torch.manual_seed(0)
    cls = ClassConditioner(ClassConfig(num_classes=3))
    model = UNet(dataclasses.replace(UNET["tiny"], num_class_embeds=4, in_channels=9,
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D"))
    inpaint = SpatialConditioner(SpatialConfig("inpaint"))
    spatial = inpaint.encode([{"mask": torch.ones(1, 64, 64), "masked_latents": torch.randn(4, 8, 8)}] * 4)
    _fit(model, cls, [0, 1, 2, 3], spatial=spatial)


@pytest.mark.parametrize("kind", ["class", "text"])
def test_dit_trains(kind):
    torch.manual_seed(0)
    if kind == "class":
        _fit(DiT(DIT["tiny"]), ClassConditioner(ClassConfig(num_classes=10)), [0, 1, 2, 10])
    else:
        enc = TransformerTextEncoder.from_captions(CAPTIONS, max_length=8, width=32, depth=1, heads=2)
        _fit(DiT(DIT["tiny-text"]), enc, CAPTIONS)
