"""The shapes demo's recipe: every setting of its three training runs, and the caption tricks that
belong to this data set (not to the library).

* Stage 1: a tiny KL-f4 autoencoder (32x32 RGB -> 8x8x4 latents) on rendered shapes.
* Stage 2, run 1 ("forward"): the UNet learns on captions re-phrased so that the left / upper object
  is always named first (`shapes.forward_caption`, a recaptioned copy of the latent cache): word order
  alone then says where things go, which a text-conditioned model picks up quickly.
* Stage 2, run 2 ("full"): `--init-from` run 1's model, a fresh optimiser and LR schedule, on the
  captions as drawn -- now "A left of B" and "B right of A" must draw the same picture.
Both stage-2 runs read the frozen all-MiniLM-L6-v2 encoder's hidden layer 2 through a trainable
context adapter, with pixel-coordinate features in the UNet (library extensions, `ldm train
--context-adapter-layers / --position-features`), and normalise prompts (case, punctuation, spacing)
the same way at training and sampling time.

The step counts are fixed: the same model comes out on every machine (the seed fixes everything, and
N processes compute the update of one, `ldmkit.training.methods.ldm.LDM.batches`).
"""
from __future__ import annotations

import random

SEED = 0
AUTOENCODER = dict(data="shapes", preset="tiny-kl-f4", steps=700, batch_size=16, lr=2e-3, adam_betas=(0.9, 0.99),
                   perceptual_weight=0.0, disc_weight=0.0, kl_weight=1e-6, ema_decay=0.99, checkpoint_every=700,
                   sample_every=700, stats_samples=512, seed=SEED, device="cpu")
CACHE = dict(length=8000, seed=SEED + 1)  # training images encoded once
LDM = dict(denoiser="unet", preset="tiny", conditioning="text", text_encoder="minilm", text_encoder_layer=2,
           normalize_text=True, context_adapter_layers=2, position_features=True, objective="v", schedule="cosine",
           timestep_sampling="stratified", batch_size=64, lr=2e-3, lr_schedule="cosine", warmup_steps=50,
           weight_decay=0.01, grad_clip=1.0, ema_decay=0.995, cond_drop=0.1, seed=SEED, sample_sampler="dpmpp_2m",
           sample_steps=20, guidance=3.0, device="cpu",
           sample_prompts=("a red circle", "a blue square to the left of a yellow circle",
                           "a green circle above a red triangle", "a yellow triangle below a blue circle"))
STAGES = {"forward": 1400, "full": 1400}  # LDM steps of the two runs
WORD_DROP = 0.0  # probability that a colour word leaves a caption of the full run (0: off)
COLOURS = ("red", "green", "blue", "yellow")

EVAL = dict(samples=200, guidance=(1.0, 3.0, 7.5), headline=3.0, sampler="dpmpp_2m", steps=20)


def drop_words(p: float, words=COLOURS, seed: int = SEED):
    """A caption transform for `LDM(caption_transform=...)`: each occurrence of `words` leaves a caption
    with probability `p` ("a red circle above a blue square" -> "a circle above a blue square"), so the
    other words must carry the meaning -- drawn from (seed, step, caption position), so a resumed run
    sees the same captions."""
    def transform(captions: list[str], step: int) -> list[str]:
        out = []
        for k, text in enumerate(captions):
            rng = random.Random(f"{seed}:{step}:{k}")
            out.append(" ".join(w for w in text.split() if w not in words or rng.random() >= p))
        return out

    return transform
