"""Write an ImageFolder tree (or a file list) as WebDataset tar shards with labels and a JSON index.

    python -m fastjepa.data.make_shards /data/imagenet/train /data/in1k-shards --shard-size 1250 --workers 16
    python -m fastjepa.data.make_shards --index-only '/data/shards/train-{000000..000999}.tar' /data/shards

SRC is a directory in ImageFolder layout (SRC/<class>/<image>, classes numbered in sorted order as torchvision
does) or a text file with one `path label` per line (relative paths are relative to the file). Samples are
shuffled once with --seed before sharding, so every shard mixes classes (the loader shuffles shards and keeps a
buffer, which cannot undo class-sorted shards). Each sample is `<key>.jpg` (or the file's own image extension)
with the original bytes, untouched unless --reencode-quality is given, `<key>.cls` (the label) and `<key>.path`
(the source path, so a bad sample logged by key can be traced back).

Resumable: a shard is written to `.tmp`, renamed when complete, then its sidecar `<shard>.json` (count, bytes,
skipped files) is written; a rerun skips shards with a sidecar. DST/index.json (the loader needs it) is written
when every shard is done. A file that is empty or not an image is skipped and listed in the index.
"""

import argparse
import hashlib
import io
import json
import logging
import os
import sys
from multiprocessing import Pool

import numpy as np
from PIL import Image, UnidentifiedImageError
from webdataset import TarWriter
from webdataset.tariterators import tarfile_samples

from fastjepa.data.sources import IMAGE_EXTS, INDEX_FORMAT, INDEX_NAME, scan_image_folder, shard_file_name
from fastjepa.progress import Progress

logger = logging.getLogger("fastjepa.make_shards")


def list_source(src):
    """-> (files, labels, classes or None) from an ImageFolder directory or a `path label` file list."""
    if os.path.isdir(src):
        classes, files, labels = scan_image_folder(src)
        return files, labels.tolist(), classes
    if not os.path.isfile(src):
        raise FileNotFoundError(f"SRC {src}: not found (pass an ImageFolder directory SRC/<class>/<image> or a "
                                "text file of `path label` lines)")
    base = os.path.dirname(os.path.abspath(src))
    files, labels = [], []
    with open(src) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{src}:{lineno}: expected `path label` (label an integer), got {line.strip()!r}")
            files.append(os.path.join(base, parts[0]))
            labels.append(int(parts[1]))
    if not files:
        raise ValueError(f"file list {src!r} is empty")
    return files, labels, None


def _digest(files, labels):
    return hashlib.sha1("\n".join(f"{f}\t{y}" for f, y in zip(files, labels, strict=True)).encode()).hexdigest()


def shard_name(prefix, i):
    return f"{prefix}-{i:06d}.tar"


def image_payload(path, data, reencode_quality):
    """-> (extension, bytes) to store, or raise ValueError naming why the file is unusable."""
    if len(data) == 0:
        raise ValueError("empty file")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only: cheap
    except UnidentifiedImageError as exn:
        raise ValueError(f"not an image ({exn})") from exn
    if reencode_quality is not None:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=reencode_quality)
        return "jpg", buf.getvalue()
    if img.format == "JPEG":
        return "jpg", data
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return (ext if ext in IMAGE_EXTS else "png"), data


def write_shard(job):
    """Write one shard (tmp + rename) and its sidecar; returns the sidecar dict."""
    dst, name, items, reencode_quality = job
    path = os.path.join(dst, name)
    count, skipped = 0, []
    with open(path + ".tmp", "wb") as stream:
        with TarWriter(stream, encoder=False, mtime=0) as tar:
            for index, file, label in items:
                try:
                    with open(file, "rb") as f:
                        ext, data = image_payload(file, f.read(), reencode_quality)
                except (OSError, ValueError) as exn:
                    skipped.append({"path": file, "reason": str(exn)})
                    continue
                tar.write({"__key__": f"{index:09d}", ext: data, "cls": str(label).encode(),
                           "path": file.encode()})
                count += 1
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(path + ".tmp", path)
    side = {"name": name, "count": count, "bytes": os.path.getsize(path), "skipped": skipped}
    _write_json(path + ".json", side)
    return side


def _write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def make_shards(src, dst, shard_size=1000, workers=1, prefix="train", seed=0, shuffle=True, reencode_quality=None,
                progress=True):
    """Shard SRC into DST; returns the index dict (also written to DST/index.json)."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    files, labels, classes = list_source(src)
    order = np.random.default_rng(seed).permutation(len(files)) if shuffle else np.arange(len(files))
    os.makedirs(dst, exist_ok=True)
    plan = {"src": os.path.abspath(src), "num_files": len(files), "shard_size": shard_size, "seed": seed,
            "shuffle": shuffle, "prefix": prefix, "reencode_quality": reencode_quality,
            "files_sha1": _digest(files, labels)}
    plan_path = os.path.join(dst, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            raise ValueError(f"{dst} holds shards from a different plan (differs in {changed}); resume needs the same "
                             f"SRC and options, or write to an empty DST")
    else:
        _write_json(plan_path, plan)
    num_shards = (len(files) + shard_size - 1) // shard_size
    jobs, done = [], {}
    for i in range(num_shards):
        name = shard_name(prefix, i)
        side_path = os.path.join(dst, name + ".json")
        if os.path.exists(side_path) and os.path.exists(os.path.join(dst, name)):
            with open(side_path) as f:
                done[name] = json.load(f)
            continue
        idx = order[i * shard_size:(i + 1) * shard_size]
        jobs.append((dst, name, [(int(j), files[j], labels[j]) for j in idx], reencode_quality))
    if done:
        logger.info("resuming: %d of %d shards already written", len(done), num_shards)
    bar = Progress("make-shards", "shards", total=num_shards, initial=len(done), disable=not progress)
    if workers > 1 and len(jobs) > 1:
        with Pool(min(workers, len(jobs))) as pool:
            for side in pool.imap_unordered(write_shard, jobs):
                done[side["name"]] = side
                bar.update(1)
    else:
        for job in jobs:
            side = write_shard(job)
            done[side["name"]] = side
            bar.update(1)
    bar.close()
    shards = [done[shard_name(prefix, i)] for i in range(num_shards)]
    index = {"format": INDEX_FORMAT, "classes": classes, "num_samples": sum(s["count"] for s in shards),
             "shards": [{"name": s["name"], "count": s["count"], "bytes": s["bytes"]} for s in shards],
             "skipped": [x for s in shards for x in s["skipped"]], "plan": plan}
    _write_json(os.path.join(dst, INDEX_NAME), index)
    for s in index["skipped"]:
        logger.warning("skipped %s: %s", s["path"], s["reason"])
    return index


def count_shard(url):
    return sum(1 for _ in tarfile_samples([{"url": url}]))


def index_existing(pattern, dst, workers=1, progress=True):
    """Count the samples of existing shards (a brace pattern) and write DST/index.json."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(pattern)
    bar = Progress("make-shards --index-only", "shards", total=len(urls), disable=not progress)
    counts = []
    with Pool(max(1, min(workers, len(urls)))) as pool:
        for count in pool.imap(count_shard, urls):
            counts.append(count)
            bar.update(1)
    bar.close()
    index = {"format": INDEX_FORMAT, "classes": None, "num_samples": sum(counts),
             "shards": [{"name": shard_file_name(u), "count": c} for u, c in zip(urls, counts, strict=True)],
             "skipped": []}
    os.makedirs(dst, exist_ok=True)
    _write_json(os.path.join(dst, INDEX_NAME), index)
    return index


def main(argv=None):
    p = argparse.ArgumentParser(prog="fastjepa make-shards", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="ImageFolder directory (SRC/<class>/<image>) or `path label` file list; with "
                               "--index-only: a brace pattern of existing shards")
    p.add_argument("dst", help="output directory (shards, sidecars, index.json)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000: ~110 MB of "
                                                                "ImageNet JPEGs)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--prefix", default="train", help="shard names PREFIX-000000.tar ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the one-off shuffle before sharding")
    p.add_argument("--no-shuffle", action="store_true", help="keep SRC order (class-sorted shards mix badly)")
    p.add_argument("--reencode-quality", type=int, default=None,
                   help="decode and re-encode every image as JPEG at this quality (default: copy bytes untouched)")
    p.add_argument("--index-only", action="store_true", help="only count existing shards SRC into DST/index.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for flag, value, low in (("--shard-size", args.shard_size, 1), ("--workers", args.workers, 1)):
        if value < low:
            p.error(f"{flag} {value}: must be at least {low}")
    if args.reencode_quality is not None and not 1 <= args.reencode_quality <= 100:
        p.error(f"--reencode-quality {args.reencode_quality}: a JPEG quality is 1 to 100 (e.g. 95)")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.index_only:
            index = index_existing(args.src, args.dst, args.workers, progress=not args.quiet)
        else:
            index = make_shards(args.src, args.dst, args.shard_size, args.workers, args.prefix, args.seed,
                                not args.no_shuffle, args.reencode_quality, progress=not args.quiet)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"fastjepa make-shards: {e}", file=sys.stderr)
        return 2
    print(f"{index['num_samples']} samples in {len(index['shards'])} shards, {len(index['skipped'])} files skipped; "
          f"index: {os.path.join(args.dst, INDEX_NAME)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
