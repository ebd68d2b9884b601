"""The official I-JEPA pretraining augmentations on PIL/numpy, without torchvision.

Behaviour matched (facebookresearch/ijepa src/transforms.py, torchvision semantics on PIL images):
RandomResizedCrop(crop_size, scale=crop_scale, ratio=(3/4, 4/3)) with bilinear resampling; optional horizontal
flip (p=0.5); optional colour distortion = ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) applied with p=0.8 (the four
adjustments in random order) then RandomGrayscale(p=0.2); optional Gaussian blur (p=0.5, radius U[0.1, 2]).

Differences, on purpose: the output is uint8 (normalisation runs on the device after the transfer, see
`normalize_on_device`), and every random draw comes from a numpy Generator handed in per sample, so a sample's
augmentation depends only on (seed, epoch, rank, worker, position) and survives a resume.

Fast path (`fast_decode=True`, the default), which changes pixels only by resampling noise: the crop box is drawn
on the full-resolution size read from the header (so the crop distribution is the official one); a JPEG whose
crop is at least 2x (4x, 8x) the output on both sides is decoded at 1/2 (1/4, 1/8) scale by libjpeg's DCT
scaling; JPEGs decode straight into numpy through simplejpeg when it is installed (else PIL); the crop is a view
and the resize is torch's uint8 antialiased bilinear on it (vectorised, within 1 grey level of PIL's
crop + resize, which is what torchvision runs). Measured by bench/bench_data.py against the plain PIL loop.
"""

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, UnidentifiedImageError

try:
    import simplejpeg  # optional: decodes JPEG straight into numpy, skipping PIL's image objects
except ImportError:
    simplejpeg = None

DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_params(width, height, scale, ratio, rng):
    """torchvision's RandomResizedCrop.get_params: (left, top, w, h) in pixels of the full image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback after 10 misses: the whole image, centre-cropped to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _adjust_hue(img, hue_factor):
    # torchvision's PIL hue shift: rotate the H channel of HSV by hue_factor * 255 (truncated, as np.uint8 does)
    # with uint8 wrap-around.
    if img.mode in ("L", "1", "I", "F"):
        return img
    h, s, v = img.convert("HSV").split()
    h_arr = np.asarray(h, dtype=np.uint8) + np.uint8(int(hue_factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(h_arr, "L"), s, v)).convert(img.mode)


def color_distortion(img, strength, rng):
    """Official get_color_distortion(s): RandomApply(ColorJitter(.8s, .8s, .8s, .2s), p=.8), RandomGrayscale(.2)."""
    if rng.random() < 0.8:
        b = c = s = 0.8 * strength
        h = 0.2 * strength
        ops = [
            lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(max(0.0, 1 - b), 1 + b)),
            lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(max(0.0, 1 - c), 1 + c)),
            lambda im: ImageEnhance.Color(im).enhance(rng.uniform(max(0.0, 1 - s), 1 + s)),
            lambda im: _adjust_hue(im, rng.uniform(-min(h, 0.5), min(h, 0.5))),
        ]
        for i in rng.permutation(4):
            img = ops[i](img)
    if rng.random() < 0.2:
        img = img.convert("L").convert(img.mode)
    return img


class PretrainTransform:
    """Image (encoded bytes, PIL image or uint8 array) -> uint8 array [H, W, C] with the official augmentations.

    `mode` is "RGB" (in_chans 3) or "L" (in_chans 1). `fast_decode=False` is torchvision's path on PIL (decode,
    convert, crop, resize); True takes the fast path (module docstring). Raises the decoder's error on undecodable
    input; the loader classifies it as a bad sample.
    """

    def __init__(self, crop_size=224, crop_scale=(0.3, 1.0), ratio=DEFAULT_RATIO, horizontal_flip=False,
                 color_distortion=False, color_jitter=1.0, gaussian_blur=False, mode="RGB", fast_decode=True):
        if mode not in ("RGB", "L"):
            raise ValueError(f"PretrainTransform mode must be 'RGB' (in_chans 3) or 'L' (in_chans 1), got {mode!r}")
        self.crop_size = int(crop_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.horizontal_flip = horizontal_flip
        self.color_distortion = color_distortion
        self.color_jitter = color_jitter
        self.gaussian_blur = gaussian_blur
        self.mode = mode
        self.fast_decode = fast_decode

    def __call__(self, image, rng):
        arr = self._fast_crop(image, rng) if self.fast_decode else self._pil_crop(image, rng)
        if self.horizontal_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        if self.color_distortion or self.gaussian_blur:
            img = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
            if self.color_distortion:
                img = color_distortion(img, self.color_jitter, rng)
            if self.gaussian_blur and rng.random() < 0.5:
                img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
            arr = _hwc(np.asarray(img))
        return arr

    def _pil_crop(self, image, rng):
        img = open_image(image)
        if img.mode != self.mode:
            img = img.convert(self.mode)
        left, top, w, h = random_resized_crop_params(img.size[0], img.size[1], self.crop_scale, self.ratio, rng)
        img = img.crop((left, top, left + w, top + h)).resize((self.crop_size, self.crop_size), Image.BILINEAR)
        return _hwc(np.asarray(img))

    def _fast_crop(self, image, rng):
        source = _Decodable(image, self.mode)
        box = random_resized_crop_params(*source.size, self.crop_scale, self.ratio, rng)
        return crop_resize(source, box, self.crop_size)


class EvalTransform:
    """Image -> uint8 array [H, W, C] for evaluation: the centre square of ``resize_ratio`` of the shorter side
    (ImageNet's "resize to 256, centre-crop 224" for 0.875), resized to ``crop_size``, decoded the way training
    decodes (DCT-reduced JPEG decode, uint8 antialiased bilinear resize)."""

    def __init__(self, crop_size: int = 224, mode: str = "RGB", resize_ratio: float = 0.875):
        if mode not in ("RGB", "L"):
            raise ValueError(f"EvalTransform mode must be 'RGB' (in_chans 3) or 'L' (in_chans 1), got {mode!r}")
        self.crop_size, self.mode, self.resize_ratio = int(crop_size), mode, float(resize_ratio)

    def __call__(self, image):
        source = _Decodable(image, self.mode)
        width, height = source.size
        side = max(1, round(min(width, height) * self.resize_ratio))
        return crop_resize(source, ((width - side) // 2, (height - side) // 2, side, side), self.crop_size)


def crop_resize(source: "_Decodable", box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The (left, top, width, height) box of an image, resized to ``size`` x ``size``: uint8 [H, W, C]."""
    left, top, w, h = box
    width, height = source.size
    # the largest DCT reduction (1/2, 1/4, 1/8: libjpeg's SIMD ones) that keeps the crop >= size
    scale = next((s for s in (8, 4, 2) if source.is_jpeg and min(w, h) >= s * size), 1)
    pixels = source.decode(scale)
    sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
    crop = _as_tensor(pixels).permute(2, 0, 1)[
        None, :, round(top * sy):max(round((top + h) * sy), round(top * sy) + 1),
        round(left * sx):max(round((left + w) * sx), round(left * sx) + 1)]
    # uint8 antialiased bilinear, channels-last: within 1 grey level of PIL's crop + resize. The crop view's
    # row stride is the whole image's; a dense channels-last copy first makes the resize ~1.7x faster.
    crop = crop.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


class _Decodable:
    """An image whose size is known before decoding, decoded at a DCT reduction of 1, 2, 4 or 8 (JPEG only)."""

    def __init__(self, image, mode):
        self.image, self.mode, self.is_jpeg, self.header = image, mode, False, None
        if isinstance(image, np.ndarray):
            self.size = (image.shape[1], image.shape[0])
            return
        if isinstance(image, (bytes, bytearray, memoryview)) and bytes(image[:2]) == b"\xff\xd8":
            if simplejpeg is not None and mode == "RGB":
                try:
                    height, width = simplejpeg.decode_jpeg_header(image)[:2]
                    self.size, self.header = (width, height), "simplejpeg"
                except ValueError:
                    pass  # PIL below tells what is wrong (or copes, e.g. with CMYK)
        if self.header is None:
            self.image = open_image(image)
            self.size = self.image.size
        self.is_jpeg = self.header == "simplejpeg" or getattr(self.image, "format", None) == "JPEG"

    def decode(self, scale):
        if isinstance(self.image, np.ndarray):
            pixels = _hwc(self.image)
            if pixels.shape[2] == len(self.mode):
                return pixels
            self.image = open_image(self.image)  # e.g. grey digits for a 3-channel model: PIL converts
        width, height = self.size
        if self.header == "simplejpeg":
            try:
                return simplejpeg.decode_jpeg(self.image, colorspace="RGB", min_height=-(-height // scale),
                                              min_width=-(-width // scale))
            except ValueError:
                self.image = open_image(self.image)  # PIL raises its own error if the data is broken
        img = self.image
        if scale > 1:
            img.draft(None, (width // scale, height // scale))
        if img.mode != self.mode:
            img = img.convert(self.mode)
        return _hwc(np.asarray(img))


def _as_tensor(pixels):
    if pixels.flags.writeable:
        return torch.from_numpy(pixels)
    with warnings.catch_warnings():  # PIL's arrays are read-only; the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels)


def _hwc(arr):
    return arr[:, :, None] if arr.ndim == 2 else arr


def open_image(image):
    """Encoded bytes / PIL image / uint8 array ([H, W] or [H, W, C]) -> PIL image (lazy for bytes)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    try:
        return Image.open(io.BytesIO(image))
    except UnidentifiedImageError:  # PIL names the buffer object (<_io.BytesIO object at 0x...>): say what it was
        raise UnidentifiedImageError(f"not an image PIL can read ({len(image)} bytes, starting "
                                     f"{bytes(image[:8])!r})") from None


def build_transform(cfg):
    """PretrainTransform from a Config's `data` section and fastjepa.in_chans."""
    d = cfg.data
    in_chans = cfg.fastjepa.in_chans
    return PretrainTransform(
        crop_size=d.crop_size,
        crop_scale=tuple(d.crop_scale),
        horizontal_flip=d.use_horizontal_flip,
        color_distortion=d.use_color_distortion,
        color_jitter=d.color_jitter_strength,
        gaussian_blur=d.use_gaussian_blur,
        mode="L" if in_chans == 1 else "RGB",
        fast_decode=d.fast_decode,
    )
