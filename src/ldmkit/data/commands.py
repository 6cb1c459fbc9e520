"""`ldm cache-latents`: encode a data set once through a frozen autoencoder (stage 2 reads the cache)."""
from __future__ import annotations

from pathlib import Path

DATA_HELP = "'shapes' (bundled synthetic set), 'fashion-mnist' (Debian dataset-fashion-mnist) or an image folder"
MAX_SIZE = 16384  # pixels
MAX_LENGTH = 10_000_000  # images drawn from the shapes set


def dataset_for_cache(data: str, size: int, length: int, seed: int, class_folders: bool,
                      segmentation: bool = False, maps: str | None = None, channels: int = 3):
    """The training images to cache, unaugmented: shapes (train split), Fashion-MNIST (train; grey, or repeated
    to `channels` = 3) or a folder.
    With ``segmentation`` the items also carry a per-pixel class map (shapes), with ``maps`` an image
    folder's items carry the label maps of that folder (same tree, PNG)."""
    if segmentation and data != "shapes":
        raise ValueError(f"--segmentation: the data set {data!r} has no built-in segmentation maps (only "
                         "'shapes' has); give an image folder's label maps with --maps DIR")
    if maps is not None and data in ("shapes", "fashion-mnist"):
        raise ValueError(f"--maps belongs to an image folder; the {data} set has "
                         + ("its own maps (--segmentation)" if data == "shapes" else "no maps"))
    if data == "shapes":
        from ldmkit.data.shapes import ShapesDataset

        return ShapesDataset("train", size=size, length=length, seed=seed, segmentation=segmentation), None
    if data == "fashion-mnist":
        from ldmkit.data.fashion_mnist import FashionMNIST

        if size not in (28, 32):
            raise ValueError(f"--size {size}: Fashion-MNIST images are 28x28 (32 when padded); use 28 or 32")
        ds = FashionMNIST("train", pad_to_32=size == 32, channels=1 if channels == 1 else 3)
        return ds, list(ds.classes)
    from ldmkit.data.images import ImageFolder

    if not Path(data).is_dir():
        raise ValueError(f"--data {data!r}: not a folder, and not 'shapes' or 'fashion-mnist'")
    ds = ImageFolder(data, size=size, class_folders=class_folders, seed=seed, maps=maps)
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
    clean = ImageFolder(data, size=size, class_folders=class_folders, seed=seed, files=good, maps=maps)
    clean.skipped = len(ds.files) - len(good)
    return clean, (list(clean.classes) or None)


def _cache(args) -> int:
    import torch

    from ldmkit.data.latents import encode_dataset
    from ldmkit.io.format import load_component

    from ldmkit.autoencoder.model import Autoencoder
    from ldmkit.errors import check_device

    if args.size is not None and not 8 <= args.size <= MAX_SIZE:
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
    size = args.size or autoencoder.config.sample_size  # the size the autoencoder was trained at
    if size % f:
        raise ValueError(f"--size {size} is not a multiple of the autoencoder's downsampling factor {f}")
    dataset, class_names = dataset_for_cache(args.data, size, args.length, args.seed, args.class_folders,
                                             segmentation=args.segmentation, maps=args.maps,
                                             channels=autoencoder.config.in_channels)
    if args.map_classes and not args.maps:
        raise ValueError("--map-classes names the classes of --maps label maps; give --maps DIR too")
    seg_classes = None
    if args.segmentation:
        from ldmkit.data.shapes import SEGMENTATION_CLASSES

        seg_classes = list(SEGMENTATION_CLASSES)
    elif args.maps:
        seg_classes = _map_classes(dataset, args.map_classes)
    from ldmkit.io.files import FolderLock

    with FolderLock(out, "ldm cache-latents"):
        out = encode_dataset(autoencoder, dataset, args.out, batch_size=args.batch_size, dtype=args.dtype,
                             class_names=class_names, overwrite=args.overwrite,
                             source={"dataset": args.data, "size": size, "seed": args.seed,
                                     **({"maps": args.maps} if args.maps else {})},
                             store_images=args.store_images, store_segmentation=seg_classes is not None,
                             segmentation_classes=seg_classes)
    skipped = getattr(dataset, "skipped", 0)
    extras = [w for w, on in (("images", args.store_images), ("label maps", seg_classes is not None)) if on]
    print(f"cached {len(dataset)} latents of {args.data}" + (f" with {' and '.join(extras)}" if extras else "")
          + f" in {out}" + (f" ({skipped} unreadable image(s) skipped)" if skipped else ""))
    return 0


def _map_classes(dataset, names: str | None) -> list[str]:
    """The label maps' class names: --map-classes, or "0" ... "N-1" for the largest id N-1 in the maps."""
    import numpy as np
    from PIL import Image

    from ldmkit.data.images import class_ids

    top = 0
    for path in dataset.files:
        m = dataset.map_path(path)
        if not m.is_file():
            raise ValueError(f"image {path} has no label map {m} (--maps mirrors the image folder, as PNG)")
        with Image.open(m) as im:
            top = max(top, int(np.max(class_ids(im, f"label map {m}"))))
    if names is None:
        return [str(i) for i in range(top + 1)]
    listed = [n.strip() for n in names.split(",") if n.strip()]
    if len(listed) <= top:
        raise ValueError(f"--map-classes names {len(listed)} classes, but the maps hold class id {top}")
    if len(listed) > 256:
        raise ValueError(f"--map-classes names {len(listed)} classes; label maps hold at most 256")
    return listed


def register(sub, argv: list[str] | None = None) -> None:
    p = sub.add_parser("cache-latents", help="encode a data set once through a frozen autoencoder for `ldm train`",
                       description="Encode images with a frozen autoencoder into safetensors shards (posterior "
                                   "mean and std, already scaled) plus captions/labels; `ldm train --latents` "
                                   "reads them.")
    p.add_argument("--autoencoder", required=True, help="autoencoder component folder (e.g. RUN/autoencoder)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the size the "
                   "autoencoder was trained at)")
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
    p.add_argument("--maps", metavar="DIR", default=None,
                   help="an image folder's label maps for `ldm train --spatial semantic`: DIR mirrors the image "
                        "tree, the map of IMAGES/a/b.jpg being DIR/a/b.png (grey or palette PNG of class ids)")
    p.add_argument("--map-classes", metavar="NAMES", default=None,
                   help="comma-separated class names of the label maps, id order (default: 0 ... the largest id)")
    p.set_defaults(func=_cache)
