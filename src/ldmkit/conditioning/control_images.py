"""Control images for ControlNets, made from an ordinary image (`ldm control-image`):

    canny         Canny edges (OpenCV's `cv2.Canny`, thresholds --low / --high; 100 / 200 as in
                  AUTOMATIC1111's ControlNet extension): white edges on black, 3 channels
    scribble      an XDoG-style line drawing: the difference of two Gaussian blurs (sigma 0.5 and 5) of
                  the image, thresholded at --threshold -- thick strokes, like a scribble ControlNet's input
    softedge      soft edges without a network: the Sobel gradient magnitude of the blurred image, scaled
                  to [0, 255] (HED / PiDiNet soft edges need weights ldmkit cannot download)
    segmentation  a segmentation map passed through as RGB (a palette PNG's colours kept)
    depth, pose   maps made elsewhere (e.g. by MiDaS or OpenPose, which need weights ldmkit cannot
                  download), checked and passed through as RGB: the hook for model-made maps

Every kind returns an RGB PIL image of the input's size (or --resolution on the short side, sides rounded
to multiples of 8).
"""
from __future__ import annotations

import numpy as np

from ldmkit.errors import UserError

KINDS = ("canny", "scribble", "softedge", "segmentation", "depth", "pose")


def _rgb_uint8(image) -> np.ndarray:
    from ldmkit.io.images import check_opaque

    check_opaque(image, "the image")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _resized(image, resolution: int | None):
    """`image` with its short side at `resolution` and both sides multiples of 8 (None: its own size)."""
    from PIL import Image

    if not resolution:
        return image
    w, h = image.size
    k = resolution / min(w, h)
    size = (max(8, round(w * k / 8) * 8), max(8, round(h * k / 8) * 8))
    return image.resize(size, Image.LANCZOS) if size != image.size else image


def make_control_image(image, kind: str, low: int = 100, high: int = 200, threshold: int = 32,
                       resolution: int | None = None):
    """PIL image -> the control image of `kind` (an RGB PIL image)."""
    import cv2
    from PIL import Image

    if kind not in KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    if not (0 <= low <= high <= 1000):
        raise UserError(f"--low {low} and --high {high} must satisfy 0 <= low <= high <= 1000")
    if not 0 <= threshold <= 255:
        raise UserError(f"--threshold {threshold} is outside [0, 255]")
    image = _resized(image, resolution)
    if kind in ("segmentation", "depth", "pose"):
        return Image.fromarray(_rgb_uint8(image))  # nearest colours kept: a palette map stays a palette map
    rgb = _rgb_uint8(image)
    if kind == "canny":
        edges = cv2.Canny(rgb, low, high)
        return Image.fromarray(np.repeat(edges[..., None], 3, axis=2))
    x = rgb.astype(np.float32)
    if kind == "scribble":
        fine, coarse = cv2.GaussianBlur(x, (0, 0), 0.5), cv2.GaussianBlur(x, (0, 0), 5.0)
        darker = np.max(coarse - fine, axis=2)  # > 0 where a pixel is darker than its surroundings: lines
        lines = (2 * darker > threshold).astype(np.uint8) * 255
        return Image.fromarray(np.repeat(lines[..., None], 3, axis=2))
    gray = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.0)
    magnitude = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    soft = (255 * magnitude / max(float(magnitude.max()), 1e-6)).round().astype(np.uint8)
    return Image.fromarray(np.repeat(soft[..., None], 3, axis=2))
