"""`ldm cache-latents`: encode a data set once through a frozen autoencoder (stage 2 reads the cache)."""
from __future__ import annotations

from pathlib import Path

DATA_HELP = "'shapes' (bundled synthetic set), 'fashion-mnist' (Debian dataset-fashion-mnist) or an image folder"
MAX_SIZE = 16384  # pixels
MAX_LENGTH = 10_000_000  # images drawn from the shapes set


def dataset_for_cache(data: str, size: int, length: int, seed: int, class_folders: bool,
                      segmentation: bool = False):
    """The training images to cache, unaugmented: shapes (train split), Fashion-MNIST (train) or a folder.
    With ``segmentation`` the items also carry a per-pixel class map (shapes only)."""
    if segmentation and data != "shapes":
        raise ValueError(f"--segmentation: the data set {data!r} has no segmentation maps; of the bundled "
                         "sets only 'shapes' provides them")
    if data == "shapes":
        from ldmkit.data.shapes import ShapesDataset

        return ShapesDataset("train", size=size, length=length, seed=seed, segmentation=segmentation), None
    if data == "fashion-mnist":
        from ldmkit.data.fashion_mnist import FashionMNIST

        if size not in (28, 32):
            raise ValueError(f"--size {size}: Fashion-MNIST images are 28x28 (32 when padded); use 28 or 32")
        ds = FashionMNIST("train", pad_to_32=size == 32, channels=3)
        return ds, list(ds.classes)
    from ldmkit.data.images import ImageFolder

    if not Path(data).is_dir():
        raise ValueError(f"--data {data!r}: not a folder, and not 'shapes' or 'fashion-mnist'")
    ds = ImageFolder(data, size=size, class_folders=class_folders, seed=seed)
    # A cache must not hold stand-ins for unreadable files: read each once and keep the good ones.
    import warnings

    good = []
    with warnings.catch_warnings(record=True) as skipped:  # one warning per unreadable file, shown below
        warnings.simplefilter("always")
        for i, path in enumerate(ds.files):
            before = ds.skipped
            ds.item(i)
            if ds.skipped == before:
                good.append(path)
    if not good:
        raise ValueError(f"--data {data}: none of the {len(ds.files)} image files could be read")
    for w in skipped:  # some files are usable: say which ones are left out
        warnings.warn(w.message, w.category, stacklevel=2)
    clean = ImageFolder(data, size=size, class_folders=class_folders, seed=seed, files=good)
    clean.skipped = len(ds.files) - len(good)
    return clean, (list(clean.classes) or None)


def _cache(args) -> int:
    import torch

    from ldmkit.data.latents import encode_dataset
    from ldmkit.io.format import load_component

    from ldmkit.autoencoder.model import Autoencoder
    from ldmkit.errors import check_device

    if not 8 <= args.size <= MAX_SIZE:
        raise ValueError(f"--size {args.size} must be in [8, {MAX_SIZE}] pixels")
    if not 1 <= args.length <= MAX_LENGTH:
        raise ValueError(f"--length {args.length} must be in [1, {MAX_LENGTH}]")
    if not 1 <= args.batch_size <= 65536:
        raise ValueError(f"--batch-size {args.batch_size} must be in [1, 65536]")
    device = check_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a latent cache is a folder")
    autoencoder = load_component(args.autoencoder, device=device)
    if not isinstance(autoencoder, Autoencoder):
        raise ValueError(f"--autoencoder {args.autoencoder} holds a {type(autoencoder).__name__} component, "
                         "not an autoencoder")
    f = autoencoder.downsample_factor
    if args.size % f:
        raise ValueError(f"--size {args.size} is not a multiple of the autoencoder's downsampling factor {f}")
    dataset, class_names = dataset_for_cache(args.data, args.size, args.length, args.seed, args.class_folders,
                                             segmentation=args.segmentation)
    seg_classes = None
    if args.segmentation:
        from ldmkit.data.shapes import SEGMENTATION_CLASSES

        seg_classes = list(SEGMENTATION_CLASSES)
    out = encode_dataset(autoencoder, dataset, args.out, batch_size=args.batch_size, dtype=args.dtype,
                         class_names=class_names, overwrite=args.overwrite,
                         source={"dataset": args.data, "size": args.size, "seed": args.seed},
                         store_images=args.store_images, store_segmentation=args.segmentation,
                         segmentation_classes=seg_classes)
    skipped = getattr(dataset, "skipped", 0)
    extras = [w for w, on in (("images", args.store_images), ("segmentation maps", args.segmentation)) if on]
    print(f"cached {len(dataset)} latents of {args.data}" + (f" with {' and '.join(extras)}" if extras else "")
          + f" in {out}" + (f" ({skipped} unreadable image(s) skipped)" if skipped else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("cache-latents", help="encode a data set once through a frozen autoencoder for `ldm train`",
                       description="Encode images with a frozen autoencoder into safetensors shards (posterior "
                                   "mean and std, already scaled) plus captions/labels; `ldm train --latents` "
                                   "reads them.")
    p.add_argument("--autoencoder", required=True, help="autoencoder component folder (e.g. RUN/autoencoder)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--size", type=int, default=32, help="image size in pixels (default 32)")
    p.add_argument("--length", type=int, default=20000, help="images drawn from the shapes set (default 20000)")
    p.add_argument("--class-folders", action="store_true", help="image folder: first-level folders are class labels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="storage type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")
    p.add_argument("--store-images", action="store_true",
                   help="also keep each image (uint8): needed by `ldm train --spatial inpaint|upscale`")
    p.add_argument("--segmentation", action="store_true",
                   help="also keep a per-pixel class map per image (shapes: background/circle/square/triangle): "
                        "needed by `ldm train --spatial semantic`")
    p.set_defaults(func=_cache)
