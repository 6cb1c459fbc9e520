"""CLI subcommands of this package (registered by ldmkit.cli): `ldm eval`, `ldm train-classifier`.

    ldm train-classifier --dataset fashion-mnist --out runs/clf-fmnist
    ldm eval --generated samples/ --reference fashion-mnist --features runs/clf-fmnist --out report.json
    ldm eval --model runs/ldm/model --dataset fashion-mnist --num 1000 --features runs/clf-fmnist
    ldm eval --model runs/shapes/model --dataset shapes --num 200 --features runs/clf-shapes
    ldm eval --generated samples/ --reference real/ --features inception:/path/pt_inception-2015-12-05-6726825d.pth
"""
from __future__ import annotations

import json
import sys


def register(sub, argv: list[str] | None = None) -> None:
    """Add this package's subcommands to the `ldm` parser."""
    p = sub.add_parser("eval", help="FID/KID/precision-recall, class accuracy and prompt adherence of samples",
                       description="Score generated images (a folder, or a model sampled here) against reference "
                                   "images. The report names the feature network that produced every number.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--generated", metavar="DIR", help="folder of generated images (class/prompt from PNG "
                     "metadata written by `ldm sample`, or class sub-folders)")
    src.add_argument("--model", metavar="MODEL", help="model folder to sample from (balanced classes for class-"
                     "conditional models; text models: --prompts-file, or the shapes prompts)")
    p.add_argument("--dataset", choices=["fashion-mnist", "shapes"], default=None,
                   help="data set of the model (sets the reference set and the prompts/classes)")
    p.add_argument("--reference", metavar="DATASET|DIR", default=None,
                   help="real images: fashion-mnist, shapes or a folder (default: --dataset)")
    p.add_argument("--reference-split", default="test", help="split of a reference data set (default test)")
    p.add_argument("--num-reference", type=int, default=2000, help="reference images used (default 2000)")
    p.add_argument("--features", default=None, metavar="SPEC",
                   help="feature network: a classifier folder from `ldm train-classifier` (offline), "
                        "'inception' (pytorch-fid weights in the torch hub cache) or 'inception:PATH'. "
                        "ldmkit cannot download Inception weights. Default with --model: the model's own "
                        "eval_classifier/ (the bundled fashion-mnist model has one)")
    p.add_argument("--classifier", metavar="DIR", default=None,
                   help="classifier for class accuracy when --features is Inception")
    p.add_argument("--num", type=int, default=1000, help="images to sample with --model (default 1000)")
    p.add_argument("--prompts-file", metavar="FILE", default=None,
                   help="prompts of a text model sampled with --model, one per line (default for --dataset shapes: "
                        "the shapes prompts of --prompt-split)")
    p.add_argument("--prompt-split", choices=["train", "heldout"], default="train",
                   help="shapes prompts to sample with --model (default train)")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32, help="sampling batch (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds for precision/recall (default 3)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--save-samples", metavar="DIR", default=None, help="also write the sampled images here")
    p.add_argument("--out", metavar="JSON", default=None, help="write the report here (also printed)")
    p.set_defaults(func=_eval)

    t = sub.add_parser("train-classifier", help="train the offline feature network / class scorer on a data set",
                       description="Train a small CNN classifier on the data set; its penultimate layer is the "
                                   "feature space for FID/KID/PR and it scores class-conditional samples.")
    t.add_argument("--dataset", choices=["fashion-mnist", "shapes"], required=True)
    t.add_argument("--out", required=True, metavar="DIR", help="component folder to write")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    t.add_argument("--test-limit", type=int, default=None,
                   help="test images for the accuracy (default: all 10000 for fashion-mnist, 2000 for shapes)")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.set_defaults(func=_train_classifier)


def _device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return dev


def _positive(name, value, most: int = 10 ** 7):
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value is not None and value > most:
        raise ValueError(f"{name}={value} is too large; at most {most}")


def _own_classifier(args) -> str:
    """The model's eval_classifier/ (the feature network its published numbers were measured with)."""
    from ldmkit.io import resolve_model_path

    own = resolve_model_path(args.model) / "eval_classifier" if args.model else None
    if own is None or not own.is_dir():
        raise ValueError("--features is required: a classifier folder from `ldm train-classifier`, or 'inception' "
                         "(only a model with an eval_classifier/ folder brings its own)")
    return str(own)


def _eval(args) -> int:
    from ldmkit.metrics import evaluate as ev
    from ldmkit.metrics.features import load_feature_network

    from ldmkit.pipelines.commands import MAX_IMAGES, SEED_RANGE

    for name, most in (("num", MAX_IMAGES), ("num_reference", 10 ** 7), ("batch_size", 65536),
                       ("kid_subsets", 10 ** 5), ("k", 10 ** 7), ("kid_subset_size", 10 ** 7)):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name), most)
    if args.kid_subset_size < 2:
        raise ValueError(f"--kid-subset-size must be >= 2, got {args.kid_subset_size}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1] - args.num:
        raise ValueError(f"--seed={args.seed} is outside the allowed range [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    device = _device(args.device)
    network = load_feature_network(args.features or _own_classifier(args), device=device)
    classifier = load_feature_network(args.classifier, device=device) if args.classifier else None
    reference = args.reference or args.dataset
    if reference is None:
        raise ValueError("pass --reference (fashion-mnist, shapes or a folder) or --dataset")
    if args.generated:
        fake = ev.images_from_folder(args.generated)
    else:
        prompts = None
        if args.prompts_file:
            from pathlib import Path

            from ldmkit.errors import check_text

            try:
                text = Path(args.prompts_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"--prompts-file {args.prompts_file}: {exc.strerror or exc}") from None
            prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
            for p in prompts:
                check_text("prompt", p)
        fake = ev.sample_model(args.model, args.num, dataset=args.dataset, seed=args.seed, sampler=args.sampler,
                               steps=args.steps, guidance=args.guidance, batch_size=args.batch_size,
                               device=device, split=args.prompt_split, prompts=prompts)
        if args.save_samples:
            _save_samples(fake, args.save_samples)
    size = fake.images.shape[-1]
    real = ev.reference_images(reference, split=args.reference_split, limit=args.num_reference,
                               image_size=size if reference == "shapes" else 32)
    report = ev.evaluate(fake.images, real.images, network, labels=fake.labels, prompts=fake.prompts,
                         classifier=classifier, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                         k=args.k, seed=args.seed, class_names=fake.extra.get("class_names"))
    report = {"generated": {"source": fake.source, **fake.extra}, "reference": real.source, **report}
    warning = (report.get("class_accuracy") or {}).get("warning")
    if warning:
        print(f"ldm eval: warning: {warning}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        from ldmkit.io.files import write_json

        write_json(args.out, report)
        print(f"wrote {args.out}", file=sys.stderr)
    print(text)
    return 0


def _save_samples(image_set, folder) -> None:
    from pathlib import Path

    from ldmkit.io.images import save_png, tensor_to_pil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(image_set.images):
        meta = {}
        if image_set.labels is not None:
            meta["class"] = image_set.labels[i]
        if image_set.prompts is not None:
            meta["prompt"] = image_set.prompts[i]
        save_png(tensor_to_pil(x), folder / f"sample-{i:05d}.png", meta)


def _train_classifier(args) -> int:
    from ldmkit.metrics.classifier import PRESETS, labelled_dataset, save_classifier, train_classifier

    import math
    from pathlib import Path

    from ldmkit.pipelines.commands import SEED_RANGE

    for name, most in (("epochs", 10 ** 4), ("batch_size", 65536), ("limit", 10 ** 8), ("test_limit", 10 ** 8),
                       ("max_steps", 10 ** 9)):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name), most)
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise ValueError(f"--seed={args.seed} is outside the allowed range [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the classifier is written as a folder")
    device = _device(args.device)
    config = PRESETS[args.dataset]
    train = labelled_dataset(args.dataset, "train", config.image_size, limit=args.limit)
    test_limit = args.test_limit or (2000 if args.dataset == "shapes" else None)
    test = labelled_dataset(args.dataset, "test", config.image_size, limit=test_limit)
    result = train_classifier(train, test, config, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              device=device, seed=args.seed, max_steps=args.max_steps)
    folder = save_classifier(result.model, args.out, dataset=args.dataset, accuracy=result.accuracy,
                             train_examples=len(train), test_examples=len(test), epochs=args.epochs,
                             steps=len(result.losses), seed=args.seed)
    print(f"test accuracy {result.accuracy:.4f} on {len(test)} {args.dataset} test images; wrote {folder}")
    return 0
