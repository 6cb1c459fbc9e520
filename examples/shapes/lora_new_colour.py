"""Teach the bundled `demo-shapes` model a colour it never saw -- cyan -- with a LoRA trained on a
handful of images, and check that it keeps what it knew.

    python examples/shapes/lora_new_colour.py --out outputs/lora-cyan

1. Renders the training images: cyan circles, squares and triangles, alone and next to a shape of a
   known colour (the library's shapes renderer, red recoloured to cyan), captioned like the data set
   ("a cyan circle to the left of a blue square"); plus "replay" images of the known colours with
   their captions, so the LoRA does not drift on what the model already draws (a recipe choice of
   this example, see REPLAY).
2. Measures the base model: the cyan prompts (the shapes analyser knows four colours; cyan is checked
   by recolouring cyan pixels to red -- after checking the image holds no red object -- and asking the
   analyser for the red prompt) and the demo's train / held-out prompt sets at guidance 3. Also the
   ceiling: the same check on the autoencoder's reconstructions of true cyan images (the model's
   autoencoder, trained on four colours, cannot draw every colour: purple comes back teal, 0 %).
3. Trains the LoRA with `ldm train --init-from demo-shapes --data DIR --lora-rank R` (method finetune).
4. Measures again with the LoRA merged (`Pipeline.load_lora`, as `ldm sample --lora` does); writes
   results.json and grid.png (cyan prompts: base row, LoRA row).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

NEW = "cyan"
NEW_RGB = (20, 170, 170)  # hue 180: 52 degrees from green, 49 from blue -- a colour the analyser does not know
SHAPES = ("circle", "square", "triangle")
KNOWN = ("yellow", "green", "blue")  # partners of the new colour in two-object images (red is the analyser's stand-in)
RELATIONS = ("to the left of", "to the right of", "above", "below")
TRAIN_IMAGES = 24  # images with the new colour
REPLAY = 256  # images of the known colours, captioned as the data set captions them
REPEATS = 1  # copies of each new-colour image
LORA = dict(lora_rank=16, lora_targets=("attn", "ff", "proj", "conv"), steps=2000, batch_size=16, lr=1e-3, seed=0)
EVAL = dict(new_prompts=48, base_prompts=200, guidance=3.0, steps=20, sampler="dpmpp_2m", seed=1000)


def new_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(f"{NEW}:{seed}")
    out = []
    for k in range(n):
        shape = SHAPES[k % 3]
        if k % 2 == 0:
            out.append(f"a {NEW} {shape}")
        else:
            other = f"a {rng.choice(KNOWN)} {rng.choice(SHAPES)}"
            out.append(f"a {NEW} {shape} {rng.choice(RELATIONS)} {other}")
    return out


def render_new(prompt: str, size: int, rng: np.random.Generator):
    """The library's rendering of the prompt with red in place of the new colour, red then recoloured."""
    from PIL import Image

    from ldmkit.data.shapes import COLOURS, parse_caption, render

    arr = np.asarray(render(parse_caption(prompt.replace(NEW, "red")), size, rng)).astype(np.float64)
    red = np.array(COLOURS["red"], dtype=np.float64)
    a = np.clip((255.0 - arr[..., 1]) / (255.0 - red[1]), 0, 1)[..., None]  # red coverage from the green channel
    # red pixels and their soft edges (not a partner's: yellow is red + green, so both gaps must be wide)
    is_red = ((arr[..., 0] - arr[..., 1] > 25) & (arr[..., 0] - arr[..., 2] > 25))[..., None]
    new = 255.0 - a * (255.0 - np.array(NEW_RGB, dtype=np.float64))
    return Image.fromarray(np.where(is_red, new, arr).round().astype(np.uint8))


def new_match(image, prompt: str) -> bool:
    """The shapes analyser's verdict on `prompt` with the new colour read as red: its pixels become red
    (soft edges kept), after checking that the image holds no red object of its own."""
    from ldmkit.metrics.shapes_analysis import _hue_chroma, adherence, analyse

    if any(o.colour == "red" for o in analyse(image).objects):
        return False
    arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    hue, chroma = _hue_chroma(arr / 255.0)
    target_hue, target_chroma = _hue_chroma(np.array(NEW_RGB, dtype=np.float64) / 255.0)
    d = np.abs(hue - target_hue)
    near = (np.minimum(d, 360 - d) <= 30)[..., None]
    a = np.clip(chroma / target_chroma, 0, 1)[..., None]
    from PIL import Image

    from ldmkit.data.shapes import COLOURS

    red = 255.0 - a * (255.0 - np.array(COLOURS["red"], dtype=np.float64))
    recoloured = Image.fromarray(np.where(near, red, arr).round().astype(np.uint8))
    return bool(adherence(recoloured, prompt.replace(NEW, "red"))["match"])


def make_data(folder: Path, seed: int, replay_images: int, repeats: int) -> None:
    """The new colour's images, each `repeats` times (kohya's folder repeats: the few new images are
    drawn as often as that many copies), and the replay images."""
    from ldmkit.data.shapes import ShapesDataset

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, prompt in enumerate(new_prompts(TRAIN_IMAGES, seed + 1)):
        image = render_new(prompt, 32, rng)
        for r in range(repeats):
            image.save(folder / f"{NEW}-{k:03d}-{r}.png")
            (folder / f"{NEW}-{k:03d}-{r}.txt").write_text(prompt + "\n")
    replay = ShapesDataset("train", size=32, length=replay_images, seed=seed + 2)
    from ldmkit.io.images import tensor_to_pil

    for k in range(replay_images):
        item = replay[k]
        tensor_to_pil(item["image"]).save(folder / f"known-{k:03d}.png")
        (folder / f"known-{k:03d}.txt").write_text(item["caption"] + "\n")


def measure(pipe, prompts_by_set: dict) -> tuple[dict, list]:
    """Match rates per set (the new colour's prompts through `new_match`, the others through the analyser)."""
    from ldmkit.metrics.shapes_analysis import adherence_report

    rates, new_images = {}, []
    for name, prompts in prompts_by_set.items():
        results = pipe.text2img(prompt=prompts, num=len(prompts), seed=EVAL["seed"], guidance=EVAL["guidance"],
                                steps=EVAL["steps"], sampler=EVAL["sampler"], batch_size=len(prompts), progress=False)
        images = [r.image for r in results]
        if name == NEW:
            new_images = images
            rates[name] = sum(new_match(im, p) for im, p in zip(images, prompts)) / len(prompts)
        else:
            rates[name] = adherence_report(images, prompts)["match_rate"]
    return rates, new_images


def ceiling(ae, n: int, seed: int) -> float:
    """`new_match` on the autoencoder's reconstructions of true renders: what a perfect LoRA could reach."""
    import torch

    from ldmkit.data.images import pil_to_unit_tensor
    from ldmkit.io.images import tensor_to_pil

    rng = np.random.default_rng(seed)
    prompts = new_prompts(n, seed)
    x = torch.stack([pil_to_unit_tensor(render_new(p, 32, rng)) for p in prompts])
    with torch.no_grad():
        rec = ae.decode_latents(ae.encode_latents(x, sample=False)).clamp(-1, 1)
    return sum(new_match(tensor_to_pil(r), p) for r, p in zip(rec, prompts)) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/lora-cyan")
    p.add_argument("--steps", type=int, default=LORA["steps"])
    p.add_argument("--lr", type=float, default=LORA["lr"])
    p.add_argument("--rank", type=int, default=LORA["lora_rank"])
    p.add_argument("--targets", nargs="+", default=list(LORA["lora_targets"]))
    p.add_argument("--replay", type=int, default=REPLAY, help="images of the known colours in the training folder")
    p.add_argument("--repeats", type=int, default=REPEATS, help="copies of each new-colour image in the folder")
    args = p.parse_args(argv)
    lora_settings = {**LORA, "steps": args.steps, "lr": args.lr, "lora_rank": args.rank,
                     "lora_targets": tuple(args.targets)}
    import torch

    from demo import eval_prompts

    from ldmkit import pipelines
    from ldmkit.io.images import make_grid
    from ldmkit.training import train
    from ldmkit.training.methods import FineTune, FineTuneConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    t0 = time.time()
    make_data(out / "data", LORA["seed"], args.replay, args.repeats)
    sets = {NEW: new_prompts(EVAL["new_prompts"], EVAL["seed"]),
            "train": eval_prompts("train", EVAL["base_prompts"], EVAL["seed"]),
            "heldout": eval_prompts("heldout", EVAL["base_prompts"], EVAL["seed"])}
    base = pipelines.load("demo-shapes", device="cpu")
    reachable = ceiling(base.autoencoder, EVAL["new_prompts"], EVAL["seed"] + 1)
    print(f"[{time.time() - t0:5.0f}s] the autoencoder's reconstructions of true {NEW} images pass the check "
          f"{100 * reachable:.1f}% of the time (the ceiling)")
    before, before_images = measure(base, sets)
    print(f"[{time.time() - t0:5.0f}s] base model: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in before.items()))
    config = FineTuneConfig(init_from="demo-shapes", data=str(out / "data"), out=str(out / "run"), resolution=32,
                            random_flip=False, sample_prompts=tuple(sets[NEW][:4]), sample_steps=20,
                            guidance=EVAL["guidance"], checkpoint_every=args.steps, sample_every=args.steps,
                            device="cpu", **lora_settings)
    t1 = time.time()
    lora = train(FineTune(config), overwrite=True)
    train_s = time.time() - t1
    print(f"[{time.time() - t0:5.0f}s] LoRA {lora} ({lora.stat().st_size / 1e3:.0f} kB) in {train_s:.0f} s")
    adapted = pipelines.load("demo-shapes", device="cpu")
    adapted.load_lora(lora)
    after, after_images = measure(adapted, sets)
    print(f"[{time.time() - t0:5.0f}s] with the LoRA: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in after.items()))
    make_grid(before_images[:12] + after_images[:12], nrow=12).save(out / "grid.png")
    result = {"colour": NEW, "rgb": NEW_RGB, "ceiling": reachable, "before": before, "after": after, "change_points": {k: 100 * (after[k] - before[k]) for k in before},
              "lora_file": str(lora), "lora_bytes": lora.stat().st_size, "train_seconds": round(train_s, 1),
              "settings": {"lora": lora_settings, "eval": EVAL, "train_images": TRAIN_IMAGES,
                           "replay_images": args.replay, "repeats": args.repeats}, "prompts": sets}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'} ({NEW} prompts; top row: base model, bottom row: "
          "with the LoRA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
