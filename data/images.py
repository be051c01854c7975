"""Source images to clean RGB uint8 arrays, the ADM/EDM centre crop, and the encoders of the shard members.

Every source image ends as RGB with 8 bits per channel, or is refused with a reason the writer counts.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# Below this the image carries no content at any of our resolutions (a 1x1 "image" upsampled is one colour).
MIN_SIDE = 8
JPEG_QUALITY = 95
SIGNATURES = (b"\xff\xd8", b"\x89PNG")


class BadImage(Exception):
    """A source file the writer skips; `reason` is the key under which it is counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes) -> Image.Image:
    """Decode fully (so truncation shows now, not later) or raise BadImage."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as e:
        # a file that starts like a JPEG or PNG but does not parse is a damaged image, not some other file
        raise BadImage("corrupt" if data.startswith(SIGNATURES) else "not_an_image", str(e)) from None
    except Exception as e:  # Pillow raises assorted types (OSError, SyntaxError, ValueError) on damaged streams
        raise BadImage("truncated" if "truncated" in str(e).lower() else "corrupt", str(e)) from None
    if min(image.size) < MIN_SIDE:
        raise BadImage("too_small", f"{image.size[0]}x{image.size[1]}")
    return image


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB 8-bit version of `image` and the conversion made (None when it already was)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: Pillow's convert() would clip at 255 instead of rescaling 0..65535 to 0..255.
        grey = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB"), "16bit"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels hold arbitrary colours; put them on white as a viewer would show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), "alpha"
    if mode == "CMYK":
        return image.convert("RGB"), "cmyk"
    if mode in ("L", "1"):
        return image.convert("RGB"), "greyscale"
    return image.convert("RGB"), f"mode_{mode}"


def centre_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM/EDM convention: halve with BOX while the short side >= 2*res, BICUBIC to short side = res, crop."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def is_plain_jpeg(image: Image.Image) -> bool:
    return image.format == "JPEG" and image.mode == "RGB"


def decode(data: bytes) -> np.ndarray:
    """PNG member bytes -> (H, W, 3) uint8. JPEG members are decoded by `reader.decode_image`, with simplejpeg."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
