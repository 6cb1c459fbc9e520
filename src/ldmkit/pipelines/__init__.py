"""Generation pipelines: text-to-image, image-to-image, inpainting, super-resolution, semantic synthesis.

    from ldmkit import pipelines
    pipe = pipelines.load("path/to/model")            # ours, diffusers folder or single file
    images = pipe.text2img("a red circle", num=4, seed=1, steps=20, guidance=7.5)
    images[0].image.save("out.png")                   # .metadata holds the settings
    pipe.semantic2img("map.png", "a red circle")      # class-map models (model_index.json concat "semantic")

`base` holds the shared wiring (settings, seeded noise, CFG with batch chunking, decode);
one module per task says what the latents start from and what the denoiser sees
concatenated to them; `pipeline` puts them together with `load`. See docs/generation.md.
"""
from ldmkit.pipelines.base import Result, Settings
from ldmkit.pipelines.pipeline import Pipeline, load

__all__ = ["Pipeline", "Result", "Settings", "load"]
