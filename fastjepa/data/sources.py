"""Where samples come from: WebDataset shards, an ImageFolder tree, synthetic JPEGs, the bundled MNIST digits.

Every source has `num_samples` and `read(epoch, seed, lo, hi)`, which yields exactly `hi - lo` items for the
positions [lo, hi) of that epoch's global order: a `RawSample` (key, encoded image or array, label, origin) or a
`BadSample` (kind, origin, key, detail) where the data is broken. One item per position, broken or not, is what
lets every rank and worker know its sample count in advance, and a bad sample can never shift a label onto the
next image: label and image always travel in the same item.

Epoch order: random-access sources (imagefolder, synthetic, mnist) permute all samples with (seed, epoch), like
DistributedSampler. Shards permute the shard order with (seed, epoch); the sample order inside a shard is fixed
and the loader's shuffle buffer mixes it.
"""

import abc
import io
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from fastjepa.data.mnist import _load_arrays

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
LABEL_KEYS = ("cls", "label", "target")
INDEX_NAME = "index.json"
INDEX_FORMAT = "fastjepa-shards-v1"


@dataclass
class RawSample:
    key: str
    image: object  # encoded bytes, or a uint8 array [H, W] / [H, W, C]
    label: int
    origin: str  # shard url or file path, for error messages


@dataclass
class BadSample:
    kind: str  # one of BAD_KINDS
    origin: str
    key: str
    detail: str


BAD_KINDS = ("empty_file", "not_image", "corrupt_image", "missing_image", "bad_label", "truncated_tar",
             "unreadable_shard", "unreadable_file")


def epoch_rng(seed, epoch, *stream):
    return np.random.default_rng([seed, epoch, *stream])


class RandomAccessSource(abc.ABC):
    """Base for sources that can fetch sample i directly: the epoch order is a full permutation."""

    num_samples = 0

    @abc.abstractmethod
    def get(self, index):
        """Sample ``index`` of the source (a ``RawSample``)."""

    def read(self, epoch, seed, lo, hi):
        order = epoch_rng(seed, epoch, 0).permutation(self.num_samples)
        for index in order[lo:hi]:
            yield self.get(int(index))


class ImageFolderSource(RandomAccessSource):
    """root/<class>/<image>, classes sorted by name and files sorted within a class, as torchvision's ImageFolder.

    The official pretraining reads `root_path/image_folder/train/`.
    """

    def __init__(self, root):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolder root {root!r} does not exist; expected the official layout "
                                    f"root_path/image_folder/train/<class>/<image> (set data.root_path and "
                                    f"data.image_folder)")
        self.root = root
        self.classes, files, self.labels = scan_image_folder(root)
        # relative paths as one fixed-width bytes array, not a list of str: forked DataLoader workers touching
        # millions of Python objects would copy their pages (refcounts), growing memory per worker
        self.relpaths = np.array([os.path.relpath(f, root).encode() for f in files])
        self.num_samples = len(self.relpaths)

    def get(self, index):
        rel = self.relpaths[index].decode()
        path = os.path.join(self.root, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exn:
            return BadSample("unreadable_file", path, rel, repr(exn))
        return RawSample(rel, data, int(self.labels[index]), path)


def scan_image_folder(root):
    """-> (classes, files, labels) with torchvision ImageFolder's order and extensions; clear error if empty."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-directories: an ImageFolder is {root}/<class>/<image>.jpg")
    files, labels = [], []
    exts = tuple("." + e for e in IMAGE_EXTS)
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(exts):
                    files.append(os.path.join(dirpath, fname))
                    labels.append(label)
    if not files:
        raise FileNotFoundError(f"{root!r} has {len(classes)} class directories but no image files "
                                f"(extensions {', '.join(IMAGE_EXTS)})")
    return classes, files, np.asarray(labels, dtype=np.int64)


class SyntheticSource(RandomAccessSource):
    """Benchmark data: a small pool of generated photo-like JPEGs (smooth colour fields + grain), so the loader
    runs the real decode path; sample i is pool image i % pool with label i % num_classes."""

    def __init__(self, num_samples, image_size=(500, 375), quality=90, pool=8, num_classes=1000, seed=0):
        self.num_samples = int(num_samples)
        self.num_classes = num_classes
        rng = np.random.default_rng(seed)
        self.pool = [synthetic_jpeg(rng, image_size, quality) for _ in range(pool)]

    def get(self, index):
        return RawSample(f"synthetic/{index:08d}", self.pool[index % len(self.pool)], index % self.num_classes,
                         "synthetic")


def synthetic_jpeg(rng, size=(500, 375), quality=90):
    """A photo-like test JPEG of `size` (width, height): upsampled random colour field plus sensor-like grain."""
    width, height = size
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 10, smooth.shape).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class MnistSource(RandomAccessSource):
    """The 5000 bundled MNIST digits (uint8 28x28 arrays, no encoding)."""

    def __init__(self):
        self.images, self.labels = _load_arrays()
        self.num_samples = len(self.images)

    def get(self, index):
        return RawSample(f"mnist/{index:04d}", self.images[index], int(self.labels[index]), "mnist_5k")


class ShardSource:
    """WebDataset tar shards with a JSON index of per-shard sample counts (written by make_shards).

    `urls`: a brace pattern, '::'-separated patterns, or a list; local paths or any url webdataset's gopen
    opens (pipe:cmd for object stores, http(s), ...). Streaming uses webdataset's tariterators; the order,
    splitting and per-position accounting are fastjepa's (see loader.py for why).
    """

    def __init__(self, urls, index=None):
        self.urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError(f"data.shards={urls!r} expands to no shard")
        missing = [u for u in self.urls if _is_local(u) and not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(self.urls)} shards in data.shards do not exist, e.g. "
                                    f"{missing[0]}; fix data.shards (or restore the files)")
        self.index_path = index or default_index_path(self.urls)
        self.counts = np.asarray(shard_counts(self.urls, self.index_path), dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        if self.num_samples == 0:
            raise ValueError(f"the shard index {self.index_path} counts 0 samples for {len(self.urls)} shards")

    def read(self, epoch, seed, lo, hi):
        order = epoch_rng(seed, epoch, 0).permutation(len(self.urls))
        ends = np.cumsum(self.counts[order])
        starts = ends - self.counts[order]
        for shard, start, end in zip(order, starts, ends, strict=True):
            if end <= lo or start >= hi:
                continue
            skip, take = max(lo - start, 0), min(hi, end) - max(lo, start)
            yield from self.read_shard(self.urls[shard], int(skip), int(take))

    def read_shard(self, url, skip, take):
        """Exactly `take` items for samples [skip, skip + take) of one shard; what the tar cannot deliver is
        reported as unreadable_shard (nothing read) or truncated_tar (the rest)."""
        errors = []
        read = 0  # samples the tar delivered, skipped ones included
        for item in self._shard_items(url, errors):
            if read >= skip + take:
                break
            if read >= skip:
                yield item
            read += 1
        missing = skip + take - max(read, skip)
        if missing > 0:
            kind = "unreadable_shard" if read == 0 else "truncated_tar"
            detail = repr(errors[0]) if errors else f"the tar ended after {read} samples, the index says more"
            for i in range(missing):
                yield BadSample(kind, url, f"#{skip + take - missing + i}", detail)

    @staticmethod
    def _shard_items(url, errors):
        def record(exn):
            errors.append(exn)
            return True  # keep going: the shard's missing samples are accounted for by read_shard

        # the sample in flight when the tar broke may have lost members: it is held back until the next one
        # arrives, and reported as truncated if the shard ends with an error
        held = None
        for sample in tarfile_samples([{"url": url}], handler=record):
            if held is not None:
                yield decode_fields(held, url)
            held = sample
        if held is not None:
            if errors:
                yield BadSample("truncated_tar", url, held.get("__key__", "?"), repr(errors[0]))
            else:
                yield decode_fields(held, url)


def decode_fields(sample, url):
    """webdataset sample dict -> RawSample, or BadSample when the image or the label is missing/unusable."""
    key = sample.get("__key__", "?")
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        return BadSample("missing_image", url, key, f"members {members} include no image ({'/'.join(IMAGE_EXTS)})")
    raw_label = next((sample[k] for k in LABEL_KEYS if k in sample), None)
    try:
        label = int(raw_label.decode().strip()) if raw_label is not None else -1
    except (ValueError, UnicodeDecodeError) as exn:
        return BadSample("bad_label", url, key, repr(exn))
    return RawSample(key, image, label, url)


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def default_index_path(urls):
    first = urls[0]
    if not _is_local(first):
        raise ValueError(f"shards {first!r} are remote: set data.shard_index to a local copy of the index.json "
                         f"written by `python -m fastjepa.data.make_shards`")
    return os.path.join(os.path.dirname(os.path.abspath(first)), INDEX_NAME)


def load_index(path):
    try:
        with gopen(path, "rb") as f:
            index = json.loads(f.read())
    except (OSError, ValueError) as exn:
        raise FileNotFoundError(
            f"cannot read the shard index {path!r} ({exn}). Shards need per-shard sample counts so that every "
            f"rank gets the same number of batches: write shards with `python -m fastjepa.data.make_shards SRC DST` "
            f"(it writes DST/{INDEX_NAME}), or index existing shards with "
            f"`python -m fastjepa.data.make_shards --index-only 'DST/shard-{{000000..000099}}.tar' DST`"
        ) from exn
    if index.get("format") != INDEX_FORMAT or "shards" not in index:
        raise ValueError(f"{path}: not a fastjepa shard index (format {index.get('format')!r}, "
                         f"expected {INDEX_FORMAT!r})")
    return index


def shard_counts(urls, index_path):
    """Per-url sample counts from the index, matched by shard file name (the url must contain it)."""
    index = load_index(index_path)
    by_name = {s["name"]: int(s["count"]) for s in index["shards"]}
    counts = []
    for url in urls:
        name = next((n for n in _name_candidates(url) if n in by_name), None)
        if name is None:
            raise ValueError(f"shard {url!r} is not in the index {index_path} ({len(by_name)} shards, e.g. "
                             f"{next(iter(by_name), None)!r}); point data.shard_index at the index of these shards")
        counts.append(by_name[name])
    return counts


def _name_candidates(url):
    # local path or url -> its basename; pipe:cmd ... path ... -> the basename of every token
    tokens = url[5:].split() if url.startswith("pipe:") else [url]
    return [os.path.basename(t.rstrip("/")) for t in tokens]


def shard_file_name(url):
    """The shard's file name in a url or pipe: command (the first token that looks like a tar)."""
    names = _name_candidates(url)
    return next((n for n in names if ".tar" in n or n.endswith(".tgz")), names[-1])
