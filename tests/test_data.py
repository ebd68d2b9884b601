"""fastjepa.data: transforms, sources, the distributed loader (coverage, equal counts, determinism, resume), bad
data, the shard writer, MNIST. Tiny images and few shards; real DataLoader workers only where the behaviour is
about workers (coverage across ranks x workers, resume with the round-robin)."""

import io
import itertools
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from fastjepa.config import ConfigError, load
from fastjepa.data import build_pretrain_loader, mean_std, normalize_on_device, transforms
from fastjepa.data.loader import BadDataError, produced_by, rank_plan
from fastjepa.data.make_shards import main as make_shards_main
from fastjepa.data.make_shards import make_shards
from fastjepa.data.mnist import load_mnist_5k
from fastjepa.data.sources import INDEX_FORMAT, ShardSource
from fastjepa.data.transforms import PretrainTransform, random_resized_crop_params


def tiny_cfg(**data):
    """test_tiny (32x32 crops, 4x4 patches) with data.* overrides."""
    overrides = [f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in data.items()]
    return load("configs/test_tiny.yaml", overrides)


def flat_jpeg(value, size=(40, 36)):
    """A flat grey JPEG: every crop of it has mean `value`, so an image can be checked against its label."""
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def value_of(label):
    return 20 + 4 * (label % 50)


def write_shards(dst, samples, per_shard):
    """samples: list of dicts for TarWriter (without __key__); writes shards + index.json like make_shards."""
    os.makedirs(dst, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(samples), per_shard)):
        name = f"s-{s:04d}.tar"
        with TarWriter(os.path.join(dst, name), encoder=False) as tar:
            for i, sample in enumerate(samples[start:start + per_shard], start):
                tar.write({"__key__": f"{i:06d}", **sample})
        shards.append({"name": name, "count": len(samples[start:start + per_shard])})
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump({"format": INDEX_FORMAT, "shards": shards}, f)
    return os.path.join(dst, f"s-{{0000..{len(shards) - 1:04d}}}.tar")


def labelled_shards(dst, n, per_shard):
    """n samples whose label is their id and whose image is flat grey value_of(id)."""
    return write_shards(dst, [{"jpg": flat_jpeg(value_of(i)), "cls": str(i).encode()} for i in range(n)], per_shard)


def run_epoch(loader, epoch=0, limit=None):
    loader.set_epoch(epoch)
    return [(images, labels, list(masks.enc), list(masks.pred))
            for (images, labels), masks in itertools.islice(loader, limit)]


def assert_images_match_labels(batches):
    for images, labels, _, _ in batches:
        means = images.float().mean(dim=(1, 2, 3))
        expected = torch.tensor([value_of(int(y)) for y in labels], dtype=torch.float32)
        assert torch.all((means - expected).abs() < 1.5), (means, expected)


# ---------------------------------------------------------------- transforms


def test_random_resized_crop_params_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, w, h = random_resized_crop_params(500, 375, (0.3, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.3 * 500 * 375 * 0.97 <= w * h <= 500 * 375
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # a strip no crop fits: torchvision's fallback, the centre crop at the nearest allowed ratio
    assert random_resized_crop_params(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (493, 0, 13, 10)


def test_transform_is_uint8_deterministic_and_fast_decode_is_resampling_noise():
    yy, xx = np.mgrid[0:512, 0:512]
    smooth = np.stack([xx / 2, yy / 2, (xx + yy) / 4], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    kw = dict(crop_size=96, crop_scale=(0.8, 1.0), color_distortion=True, gaussian_blur=True, horizontal_flip=True)
    fast, plain = PretrainTransform(**kw), PretrainTransform(**kw, fast_decode=False)
    a, b = fast(data, np.random.default_rng(3)), fast(data, np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, fast(data, np.random.default_rng(4)))
    # crops >= 2x the output decode at 1/2 scale: same crop, only resampling differs (a few grey levels)
    c = plain(data, np.random.default_rng(3))
    assert np.abs(a.astype(int) - c.astype(int)).mean() < 2.0
    grey = PretrainTransform(crop_size=16, mode="L")(data, np.random.default_rng(0))
    assert grey.shape == (16, 16, 1)
    digit_as_rgb = PretrainTransform(crop_size=16)(np.full((28, 28), 7, np.uint8), np.random.default_rng(0))
    assert digit_as_rgb.shape == (16, 16, 3) and (digit_as_rgb == 7).all()


@pytest.mark.parametrize("decoder", ["simplejpeg", "pil"])
def test_fast_path_is_within_one_grey_level_of_torchvision_order(decoder, monkeypatch):
    if decoder == "pil":
        monkeypatch.setattr(transforms, "simplejpeg", None)
    elif transforms.simplejpeg is None:
        pytest.skip("simplejpeg not installed")
    rng = np.random.default_rng(0)
    photo = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)).resize((400, 300)).save(photo, "JPEG")
    digit = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    # crops smaller than 2x the output: full-resolution decode, so only the resize implementation differs
    for image, kw in ((photo.getvalue(), dict(crop_size=224)), (digit, dict(crop_size=28, mode="L"))):
        for seed in range(5):
            fast = PretrainTransform(**kw)(image, np.random.default_rng(seed))
            ref = PretrainTransform(**kw, fast_decode=False)(image, np.random.default_rng(seed))
            assert fast.shape == ref.shape and np.abs(fast.astype(int) - ref.astype(int)).max() <= 1


def test_normalize_on_device_matches_float64_reference():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    out = normalize_on_device(x, mean, std, torch.float32)
    assert out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-6
    half = normalize_on_device(x, mean, std, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and ((half.double() - ref).norm() / ref.norm()) < 1e-2
    # the loader's batches are channels-last strided; the result is contiguous NCHW with the same values
    cl = normalize_on_device(x.contiguous(memory_format=torch.channels_last), mean, std, torch.float32)
    assert cl.is_contiguous() and torch.equal(cl, out)
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(x.float(), mean, std)


@pytest.mark.gpu
def test_pinned_channels_last_batch_to_cuda_and_normalize():
    cfg = tiny_cfg(source="synthetic", synthetic_samples=16, pin_mem=True)
    (images, _), _, _ = next(iter(build_pretrain_loader(cfg)))
    assert images.is_pinned()
    mean, std = mean_std(cfg)
    on_gpu = normalize_on_device(images.to("cuda", non_blocking=True), mean, std, torch.bfloat16)
    ref = normalize_on_device(images, mean, std, torch.float32)
    assert on_gpu.is_contiguous() and ((on_gpu.float().cpu() - ref).norm() / ref.norm()) < 1e-2


# ---------------------------------------------------------------- distributed streaming


def test_rank_plan_and_round_robin_count():
    assert rank_plan(43, 4, 2, 2) == (5, [3, 2])
    assert [produced_by(w, 5, 2) for w in range(2)] == [3, 2]
    assert [produced_by(w, 0, 3) for w in range(3)] == [0, 0, 0]


def test_exactly_once_over_2_ranks_x_2_workers_with_uneven_shards(tmp_path):
    # 43 samples in shards of 6 (last one 1): each rank gets 43 // (2 * 4) = 5 batches; 3 samples are the
    # epoch's drop_last; nothing is seen twice
    pattern = labelled_shards(tmp_path / "shards", 43, 6)
    seen, lengths = [], []
    for rank in range(2):
        loader = build_pretrain_loader(tiny_cfg(source="webdataset", shards=pattern, batch_size=4, num_workers=2,
                                                shuffle_buffer=5), rank=rank, world_size=2)
        batches = run_epoch(loader)
        lengths.append((len(loader), len(batches)))
        seen += [int(y) for b in batches for y in b[1]]
        assert_images_match_labels(batches)
    assert lengths == [(5, 5), (5, 5)]
    assert len(seen) == len(set(seen)) == 40 and set(seen) <= set(range(43))


def test_fewer_shards_than_ranks_x_workers_still_exactly_once(tmp_path):
    pattern = labelled_shards(tmp_path / "shards", 32, 16)  # 2 shards for 2 ranks x 2 workers
    seen = []
    for rank in range(2):
        loader = build_pretrain_loader(tiny_cfg(source="webdataset", shards=pattern, batch_size=4, num_workers=2),
                                       rank=rank, world_size=2)
        seen += [int(y) for b in run_epoch(loader) for y in b[1]]
    assert sorted(seen) == list(range(32))


def test_pipe_urls_stream_like_object_stores_and_a_failing_command_is_an_unreadable_shard(tmp_path):
    labelled_shards(tmp_path / "shards", 12, 6)
    index = str(tmp_path / "shards" / "index.json")
    shards = f"pipe:cat {tmp_path}/shards/s-{{0000..0001}}.tar"
    loader = build_pretrain_loader(tiny_cfg(source="webdataset", shards=shards, shard_index=index, batch_size=4))
    assert sorted(int(y) for b in run_epoch(loader) for y in b[1]) == list(range(12))
    shards = f"pipe:cat {tmp_path}/shards/s-0000.tar::pipe:cat {tmp_path}/missing/s-0001.tar"
    loader = build_pretrain_loader(tiny_cfg(source="webdataset", shards=shards, shard_index=index, batch_size=2,
                                            max_bad_fraction=0.5))
    batches = run_epoch(loader)
    assert len(batches) == 6 and loader.bad_counts() == {"unreadable_shard": 6}
    assert_images_match_labels(batches)


def test_equal_batch_counts_per_rank_imagefolder_layout(tmp_path):
    root = tmp_path / "in1k"
    for c in range(3):  # 7 + 8 + 9 = 24 files, 3 ranks x batch 5: 1 batch each, 9 dropped
        os.makedirs(root / "sub" / "train" / f"class{c}")
        for i in range(7 + c):
            (root / "sub" / "train" / f"class{c}" / f"{i}.jpg").write_bytes(flat_jpeg(value_of(c)))
    counts = []
    for rank in range(3):
        loader = build_pretrain_loader(tiny_cfg(source="imagefolder", root_path=str(root), image_folder="sub",
                                                batch_size=5), rank=rank, world_size=3)
        batches = run_epoch(loader)
        counts.append((len(loader), len(batches)))
        assert_images_match_labels(batches)
    assert counts == [(1, 1)] * 3


def test_imagefolder_unreadable_and_empty_files_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "r" / "f" / "train" / "c0"
    os.makedirs(folder)
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(flat_jpeg(value_of(0)))
    (folder / "empty.jpg").write_bytes(b"")
    os.symlink(tmp_path / "nowhere.jpg", folder / "dangling.jpg")
    loader = build_pretrain_loader(tiny_cfg(source="imagefolder", root_path=str(tmp_path / "r"), image_folder="f",
                                            batch_size=2, max_bad_fraction=0.3))
    batches = run_epoch(loader)
    assert len(batches) == 4 and loader.bad_counts() == {"empty_file": 1, "unreadable_file": 1}
    assert_images_match_labels(batches)


def test_deterministic_and_epochs_differ(tmp_path):
    pattern = labelled_shards(tmp_path / "shards", 24, 5)
    cfg = tiny_cfg(source="webdataset", shards=pattern, batch_size=4, shuffle_buffer=6)
    a, b = run_epoch(build_pretrain_loader(cfg)), run_epoch(build_pretrain_loader(cfg))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
        assert all(torch.equal(p, q) for p, q in zip(x[2] + x[3], y[2] + y[3], strict=True))
    c = run_epoch(build_pretrain_loader(cfg), epoch=1)
    assert [int(v) for x in a for v in x[1]] != [int(v) for x in c for v in x[1]]
    assert sorted(int(v) for x in a for v in x[1]) == sorted(int(v) for x in c for v in x[1]) == list(range(24))


@pytest.mark.parametrize("source", ["webdataset", "synthetic"])
def test_resume_continues_the_epoch_exactly(tmp_path, source):
    pattern = labelled_shards(tmp_path / "shards", 40, 7)
    cfg = tiny_cfg(source=source, shards=pattern, batch_size=4, num_workers=2, shuffle_buffer=6,
                   synthetic_samples=40)
    full = run_epoch(build_pretrain_loader(cfg), epoch=1)
    assert len(full) == 10
    first = build_pretrain_loader(cfg)
    head = run_epoch(first, epoch=1, limit=3)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps must survive serialisation
    assert state["batches"] == 3 and state["collator"]["step"] == 10 + 2
    resumed = build_pretrain_loader(cfg)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for x, y in zip(head + [(t[0][0], t[0][1], list(t[1].enc), list(t[1].pred)) for t in tail], full, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
        assert all(torch.equal(p, q) for p, q in zip(x[2] + x[3], y[2] + y[3], strict=True))
    # Another data.num_workers: the same share of the epoch is behind, the position inside it is approximate.
    other = build_pretrain_loader(tiny_cfg(source=source, shards=pattern, batch_size=4, num_workers=1,
                                           synthetic_samples=40))
    assert other.load_state_dict(state) is False
    assert other.consumed == 3
    assert len(list(other)) == len(full) - 3


@pytest.mark.parametrize(("saved", "now"), [(2, 1), (1, 2)])
def test_another_world_size_continues_at_the_same_share_of_the_epoch(saved, now):
    """A checkpoint of 2 ranks resumed on 1 (and 1 on 2): the epoch continues after the same number of samples,
    approximately; the position is exact again from the next epoch on."""
    cfg = tiny_cfg(source="synthetic", batch_size=4, num_workers=2, synthetic_samples=48)
    writer = build_pretrain_loader(cfg, rank=0, world_size=saved)
    run_epoch(writer, epoch=0, limit=2)
    state = json.loads(json.dumps(writer.state_dict()))
    reader = build_pretrain_loader(cfg, rank=0, world_size=now)
    reader.set_epoch(0)
    assert reader.load_state_dict(state) is False
    assert reader.consumed * now == 2 * saved  # the same samples of the epoch behind
    remaining = len(reader) - reader.consumed
    assert len(list(reader)) == remaining
    reader.set_epoch(1)
    assert len(list(reader)) == len(reader)


# ---------------------------------------------------------------- bad data


def test_every_bad_data_kind_is_skipped_counted_and_never_shifts_labels(tmp_path, caplog):
    good = [{"jpg": flat_jpeg(value_of(i)), "cls": str(i).encode()} for i in range(40)]
    truncated_jpeg = flat_jpeg(value_of(40), size=(64, 64))[:300]
    bad = [
        {"jpg": truncated_jpeg, "cls": b"40"},  # corrupt_image
        {"jpg": b"this is text, not a picture", "cls": b"41"},  # not_image
        {"jpg": b"", "cls": b"42"},  # empty_file
        {"txt": b"caption only", "cls": b"43"},  # missing_image
    ]
    samples = good[:10] + bad + good[10:]  # 44 samples, 8 per shard -> 6 shards
    pattern = write_shards(tmp_path / "shards", samples, 8)
    # shard 4 cut mid-file (truncated tar), shard 5 unreadable (not a tar any more)
    path4 = tmp_path / "shards" / "s-0004.tar"
    path4.write_bytes(path4.read_bytes()[:4096])
    (tmp_path / "shards" / "s-0005.tar").write_bytes(b"\x00garbage, not a tar archive" * 40)
    cfg = tiny_cfg(source="webdataset", shards=pattern, batch_size=4, max_bad_fraction=0.5)
    loader = build_pretrain_loader(cfg)
    with caplog.at_level("WARNING", logger="fastjepa.data.loader"):
        batches = run_epoch(loader)
    assert len(batches) == len(loader) == 11
    assert_images_match_labels(batches)
    counts = loader.bad_counts()
    assert counts["corrupt_image"] == 1 and counts["not_image"] == 1 and counts["empty_file"] == 1
    assert counts["missing_image"] == 1 and counts["unreadable_shard"] == 4 and counts["truncated_tar"] >= 1
    assert loader.state_dict()["bad"] == counts
    logged = caplog.text
    assert "s-0001.tar" in logged and "key=000010" in logged and "s-0005.tar" in logged
    labels = [int(y) for b in batches for y in b[1]]
    assert not {40, 41, 42, 43} & set(labels)  # a broken sample never lends its label to another image
    # two ranks with the bad samples spread unevenly between them still yield the same number of batches
    for rank in range(2):
        loader = build_pretrain_loader(cfg, rank=rank, world_size=2)
        batches = run_epoch(loader)
        assert len(batches) == len(loader) == 5
        assert_images_match_labels(batches)


def test_a_shard_read_from_its_middle_reports_what_it_cannot_deliver(tmp_path):
    pattern = labelled_shards(tmp_path / "shards", 16, 8)
    source = ShardSource(pattern)
    cut = tmp_path / "shards" / "s-0001.tar"
    cut.write_bytes(cut.read_bytes()[:3 * 1536])  # about two samples survive
    kinds = [getattr(x, "kind", "ok") for x in source.read_shard(str(cut), skip=4, take=3)]
    assert kinds == ["truncated_tar"] * 3
    kinds = [getattr(x, "kind", "ok") for x in source.read_shard(str(tmp_path / "gone.tar"), skip=4, take=3)]
    assert kinds == ["unreadable_shard"] * 3
    labels = [x.label for x in source.read_shard(source.urls[0], skip=5, take=2)]
    assert labels == [5, 6]


def test_too_many_bad_samples_abort_with_the_counts(tmp_path):
    samples = [{"jpg": flat_jpeg(value_of(i)), "cls": str(i).encode()} for i in range(12)]
    samples += [{"jpg": b"", "cls": b"0"}] * 4
    pattern = write_shards(tmp_path / "shards", samples[12:] + samples[:12], 16)
    loader = build_pretrain_loader(tiny_cfg(source="webdataset", shards=pattern, batch_size=4, max_bad_fraction=0.1,
                                            shuffle_buffer=0))
    # 0.1 of the 16-sample epoch is 1.6 samples: the first batch's 4 bad ones make the excess certain, and the run
    # stops there, three batches before the epoch ends
    with pytest.raises(BadDataError, match=r"4 of 8 samples read are bad \(empty_file=4\).*max_bad_fraction=0.1"):
        run_epoch(loader)
    # a budget of 0 stops at the first batch that skipped a sample, not at the end of the epoch
    pattern = write_shards(tmp_path / "one_bad", samples[-1:] + samples[:15], 16)
    strict = build_pretrain_loader(tiny_cfg(source="webdataset", shards=pattern, batch_size=4, max_bad_fraction=0,
                                            shuffle_buffer=0))
    with pytest.raises(RuntimeError, match=r"1 of 5 samples read are bad \(empty_file=1\)"):
        next(iter(strict))


def test_bad_samples_within_the_epochs_budget_never_stop_the_run(tmp_path):
    """12 unreadable samples at the very start of a 1,200-sample epoch are 1%: within data.max_bad_fraction=0.01,
    however early they come (the budget was judged over the first 1,000 samples read before)."""
    good = [{"jpg": flat_jpeg(value_of(i % 40), size=(34, 34)), "cls": str(i % 40).encode()} for i in range(1188)]
    pattern = write_shards(tmp_path / "shards", [{"jpg": b"", "cls": b"0"}] * 12 + good, 1200)
    loader = build_pretrain_loader(tiny_cfg(source="webdataset", shards=pattern, batch_size=100, shuffle_buffer=0,
                                            max_bad_fraction=0.01))
    assert len(run_epoch(loader)) == len(loader) == 12
    assert loader.bad_counts() == {"empty_file": 12}


def test_missing_index_and_unknown_source_say_how_to_fix(tmp_path):
    (tmp_path / "a-0.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="make_shards"):
        build_pretrain_loader(tiny_cfg(source="webdataset", shards=str(tmp_path / "a-0.tar")))
    with pytest.raises(ConfigError, match="did you mean 'webdataset'"):
        tiny_cfg(source="webdatset")
    with pytest.raises(ConfigError, match="data.shards"):
        tiny_cfg(source="webdataset")


# ---------------------------------------------------------------- shard writer


def test_make_shards_round_trip_resume_and_index(tmp_path, capsys):
    src = tmp_path / "folder"
    originals = {}
    for c, name in enumerate(["ant", "bee"]):
        os.makedirs(src / name)
        for i in range(5):
            data = flat_jpeg(value_of(10 * c + i), size=(30 + i, 20))
            (src / name / f"{i}.jpg").write_bytes(data)
            originals[str(src / name / f"{i}.jpg")] = (data, c)
    (src / "bee" / "broken.jpg").write_bytes(b"")
    dst = tmp_path / "shards"
    make_shards_main([str(src), str(dst), "--shard-size", "3", "--workers", "1", "--quiet"])
    assert "10 samples in 4 shards, 1 files skipped" in capsys.readouterr().out
    index = json.loads((dst / "index.json").read_text())
    counts = [s["count"] for s in index["shards"]]  # 11 files in shards of 3, the empty one skipped
    assert index["classes"] == ["ant", "bee"] and sum(counts) == index["num_samples"] == 10 and max(counts) == 3
    assert index["skipped"][0]["path"].endswith("broken.jpg")
    written = {}
    for s in index["shards"]:
        with tarfile.open(dst / s["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, payload in members.items():
            key, ext = name.split(".", 1)
            written.setdefault(key, {})[ext] = payload
    assert len(written) == 10
    for sample in written.values():
        data, label = originals[sample["path"].decode()]
        assert sample["jpg"] == data and int(sample["cls"]) == label  # bytes copied, not re-encoded

    # resume: a lost shard is rewritten, the others are left alone
    mtimes = {s["name"]: os.path.getmtime(dst / s["name"]) for s in index["shards"]}
    os.remove(dst / "train-000002.tar.json")
    make_shards(str(src), str(dst), shard_size=3, progress=False)
    assert all(os.path.getmtime(dst / n) == t for n, t in mtimes.items() if n != "train-000002.tar")
    assert json.loads((dst / "index.json").read_text())["shards"] == index["shards"]
    with pytest.raises(ValueError, match="different plan"):
        make_shards(str(src), str(dst), shard_size=4, progress=False)

    # --index-only recounts existing shards (e.g. shards written by another tool)
    recount = tmp_path / "recount"
    make_shards_main(["--index-only", str(dst / "train-{000000..000003}.tar"), str(recount), "--workers", "1",
                      "--quiet"])
    assert json.loads((recount / "index.json").read_text())["shards"] == [
        {"name": s["name"], "count": s["count"]} for s in index["shards"]]

    # a file list with its own labels
    (tmp_path / "list.txt").write_text("folder/ant/0.jpg 7\nfolder/bee/1.jpg 3\n")
    listed = make_shards(str(tmp_path / "list.txt"), str(tmp_path / "listed"), shard_size=8, progress=False)
    with tarfile.open(tmp_path / "listed" / "train-000000.tar") as tar:
        labels = sorted(int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls"))
    assert listed["num_samples"] == 2 and labels == [3, 7]

    # and the loader reads them back with the same labels
    loader = build_pretrain_loader(tiny_cfg(source="webdataset", shards=str(dst / "train-{000000..000003}.tar"),
                                            batch_size=5))
    labels = sorted(int(y) for b in run_epoch(loader) for y in b[1])
    assert labels == [0] * 5 + [1] * 5


# ---------------------------------------------------------------- MNIST and synthetic


def test_mnist_5k_and_its_loader():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.equal(labels.bincount(), torch.full((10,), 500))
    cfg = load("configs/demo_mnist.yaml", ["data.source=mnist", "data.batch_size=16"])
    loader = build_pretrain_loader(cfg)
    assert len(loader) == 5000 // 16
    (x, y), masks = next(iter(loader))
    crop = cfg.data.crop_size  # the demo trains on upsampled digits
    assert x.shape == (16, 1, crop, crop) and x.dtype == torch.uint8 and y.shape == (16,)
    assert masks.num_context_blocks == cfg.mask.num_enc_masks and masks.num_target_blocks == cfg.mask.num_pred_masks
    assert mean_std(cfg) == ((0.1307,), (0.3081,))
    with pytest.raises(ConfigError, match="mirrored digit"):
        load("configs/demo_mnist.yaml", ["data.source=mnist", "data.use_horizontal_flip=true"])


def test_an_unreadable_image_is_described_by_its_bytes_not_by_a_buffer_address():
    from PIL import UnidentifiedImageError

    from fastjepa.data.transforms import open_image

    with pytest.raises(UnidentifiedImageError) as info:
        open_image(b"<html>not an image</html>")
    assert "BytesIO" not in str(info.value) and "25 bytes, starting b'<html>no'" in str(info.value)
