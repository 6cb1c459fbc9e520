"""Generation pipelines: text-to-image, image-to-image, inpainting, super-resolution, semantic synthesis.

    from ldmkit import pipelines
    pipe = pipelines.load("path/to/model")            # ours, diffusers folder or single file
    images = pipe.text2img("a red circle", num=4, seed=1, steps=20, guidance=7.5)
    images[0].image.save("out.png")                   # .metadata holds the settings
    pipe.semantic2img("map.png", "a red circle")      # class-map models (model_index.json concat "semantic")

`base` holds the shared wiring (loading, settings, seeded noise, CFG with batch
chunking, decode); one module per task says what the latents start from and what the
denoiser sees concatenated to them. See docs/generation.md.
"""
from ldmkit.pipelines.base import Pipeline, Result, Settings, load

__all__ = ["Pipeline", "Result", "Settings", "load"]
