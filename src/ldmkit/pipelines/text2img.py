"""Text-to-image (and class-to-image, and unconditional) generation: sample from noise, decode.

    results = pipe.text2img("a red square", negative_prompt="blurry", num=4, seed=1,
                            sampler="dpmpp_2m", steps=20, guidance=7.5, height=512, width=512)

Image i of the call uses seed + i. `prompt` may be a list: images cycle through it
(num images in all, at least one per prompt). Canvases larger than the training size are
fine for the UNet (it is convolutional; the LDM paper samples 1024 px from a 256 px model
this way) and for DiT (positions are interpolated onto the training grid, see
ldmkit.denoisers.dit.pos_embed_2d); quality away from the training size is the model's.
"""
from __future__ import annotations

from ldmkit.pipelines import control, image_prompt as ip
from ldmkit.pipelines.base import PipelineCore, Result, image_count


def text2img(pipe: PipelineCore, prompt=None, *, negative_prompt=None, class_label=None, num: int | None = None,
             seed: int = 0, control_image=None, guess_mode: bool = False, control_fit: str = "stretch",
             image_prompt=None, **settings) -> list[Result]:
    """`control_image`: one per loaded ControlNet (`Pipeline.load_controlnet`); without height / width
    the output takes the first control image's size. `image_prompt`: an image (or several) for the loaded
    IP-Adapter (`Pipeline.load_ip_adapter`)."""
    pipe.require_task("text2img")
    if getattr(getattr(pipe.conditioner, "config", None), "requires_aesthetics_score", False):
        from ldmkit.errors import UserError

        raise UserError("this is an SDXL refiner: it refines images (ldm img2img) or continues a base model's "
                        "latents (--refiner on the base); text-to-image needs the base model")
    n = image_count(prompt, num)
    if control_image is not None:
        control_image = control.open_images(control_image)  # read once: for the size and the control
        if settings.get("height") is None and settings.get("width") is None and control_image:
            settings.update(control.image_size(pipe, control_image))
    s = pipe.settings(**settings)
    conditions = pipe.conditions(prompt, class_label, n)
    images, meta = control.prepare(pipe, control_image, s.height, s.width, guess_mode, control_fit)
    inputs = {"control": images, "guess_mode": guess_mode} if images else {}
    tokens, ip_meta = ip.prepare(pipe, image_prompt)
    if tokens:
        inputs["image_tokens"] = tokens
    return pipe.generate("text2img", s, conditions, negative_prompt, int(seed), lambda idx: inputs, {**meta, **ip_meta})
