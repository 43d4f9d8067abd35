"""Datasets and bad input: idx parsing, Fashion-MNIST fast path, ImageFolder faults,
each with its one clear message."""
from __future__ import annotations

import gzip
import logging
import struct

import numpy as np
import pytest
import torch

from conftest import make_image_folder, write_image
from transnext.cli import main
from transnext.data import DataError, ImageFolder, TensorBatches, read_idx
from transnext.data.fashion_mnist import load_fashion_mnist


def _idx(path, arr: np.ndarray, gz=True):
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fake_fashion(root, n_train=12, n_test=7):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return root


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert np.array_equal(read_idx(_idx(tmp_path / "a.gz", arr)), arr)
    assert np.array_equal(read_idx(_idx(tmp_path / "a", arr, gz=False)), arr)


def test_idx_bad_magic_and_size_name_the_file(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 20)
    with pytest.raises(DataError, match="bad magic.*|.*bad-images-idx3-ubyte"):
        read_idx(bad)
    with pytest.raises(DataError) as e:
        read_idx(bad)
    assert str(bad) in str(e.value)
    arr = np.zeros((3, 28, 28))
    p = _idx(tmp_path / "short-idx3-ubyte", arr, gz=False)
    p.write_bytes(p.read_bytes()[:-10])  # truncated data
    with pytest.raises(DataError, match="short-idx3-ubyte.*holds"):
        read_idx(p)
    gz = tmp_path / "notgz-idx3-ubyte.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="notgz-idx3-ubyte.gz"):
        read_idx(gz)


def test_fashion_mnist_loader_and_corrupt_file_via_cli(tmp_path, capsys):
    root = fake_fashion(tmp_path / "fm")
    x, y = load_fashion_mnist(str(root), "train")
    assert x.shape == (12, 28, 28) and x.dtype == torch.uint8 and y.shape == (12,)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    rc = main(["train", "--recipe", "fmnist-femto", "--data-dir", str(root), "--output",
               str(tmp_path / "o"), "--epochs", "1", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "t10k-labels-idx1-ubyte.gz" in err and "Traceback" not in err


def test_tensor_batches_shards_and_augments():
    x = torch.arange(10 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(10, 28, 28)
    y = torch.arange(10)
    # evaluation: ranks cover every sample once, no padding (uneven last shard)
    seen = []
    for r in range(3):
        tb = TensorBatches(x, y, 2, 28, train=False, rank=r, world_size=3)
        seen += [int(v) for _, lab in tb for v in lab]
    assert sorted(seen) == list(range(10))
    # training: the same permutation on every rank, disjoint shards, padded to equal size
    shards = [TensorBatches(x, y, 2, 32, train=True, rank=r, world_size=2, seed=3,
                            drop_last=False) for r in range(2)]
    labs = [[int(v) for _, lab in s for v in lab] for s in shards]
    assert len(labs[0]) == len(labs[1]) == 5 and sorted(labs[0] + labs[1]) == list(range(10))
    xb, _ = next(iter(shards[0]))
    assert xb.shape == (2, 1, 32, 32) and xb.dtype == torch.float32
    # an epoch's batches are reproducible
    a = [b for b, _ in shards[0]]
    b = [b for b, _ in shards[0]]
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_corrupt_and_truncated_images_are_skipped_with_count(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", ["a", "b"], 3)
    (root / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = write_image(root / "b" / "big.png", 1, 9, size=64)
    (root / "b" / "cut.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with caplog.at_level(logging.WARNING, logger="transnext.data"):
        ds = ImageFolder(root)
    assert len(ds) == 7 and len(ds.skipped) == 2
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 2 corrupt or truncated image(s)" in msg
    assert "broken.jpg" in msg and "cut.png" in msg
    img, target = ds[0]
    assert target == 0


def test_empty_class_folder_and_missing_dir_messages(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d" / "train", ["a", "b"], 2)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty class folder.*empty"):
        ImageFolder(root)
    base = ["--model", "transnext_femto", "--output", str(tmp_path / "o"), "--epochs", "1",
            "--no-progress", "--input-size", "32"]
    assert main(["train", "--data-dir", str(tmp_path / "d"), *base]) == 2
    err = capsys.readouterr().err
    assert f"empty class folder (no image files): {root / 'empty'}" in err
    assert "Traceback" not in err
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as e:  # refused as the flag is parsed
        main(["train", "--data-dir", str(missing), *base])
    assert e.value.code == 2
    assert f"--data-dir: folder not found: {missing}" in capsys.readouterr().err


def test_all_images_unreadable_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="no readable images"):
        ImageFolder(tmp_path)


def test_class_names_ship_with_package():
    from transnext.data import (fashion_mnist_classes, imagenet_a_wnids, imagenet_classes,
                                imagenet_r_wnids, imagenet_wnids)
    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    assert names[207] == "golden retriever" and names[999] == "toilet tissue"
    w = imagenet_wnids()
    assert len(w) == 1000 and w == sorted(w) and w[0] == "n01440764"
    assert len(imagenet_a_wnids()) == len(set(imagenet_a_wnids())) == 200
    assert len(imagenet_r_wnids()) == 200 and set(imagenet_r_wnids()) <= set(w)
    assert fashion_mnist_classes() == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_unverified_folder_skips_bad_file_on_load(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", ["a"], 2)
    (root / "a" / "img_1b.jpg").write_bytes(b"garbage")  # sorts between img_0 and img_1
    ds = ImageFolder(root, verify=False)
    assert len(ds) == 3
    with caplog.at_level(logging.WARNING, logger="transnext.data"):
        imgs = [ds[i][0] for i in range(3)]
    assert len(imgs) == 3 and len(ds.skipped) == 1
    assert "img_1b.jpg" in caplog.text


def _write_shards(src, dst, per_shard=5, corrupt=None):
    """Pack an ImageFolder split into webdataset-style tars: <key>.<ext> + <key>.cls."""
    import io
    import tarfile
    classes = sorted(p.name for p in src.iterdir())
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((src / c).iterdir())]
    dst.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(files), per_shard):
        with tarfile.open(dst / f"shard-{s // per_shard:04d}.tar", "w") as tf:
            for j, (f, ci) in enumerate(files[s:s + per_shard]):
                key = f"s{s + j:05d}"
                data = f.read_bytes() if key != corrupt else b"broken image bytes"
                for name, blob in ((key + f.suffix, data), (key + ".cls", str(ci).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    return classes


def test_tar_shards_train_and_eval(tiny_folder, tmp_path, model_name, caplog, capsys):
    import json
    from transnext.data.shards import TarShards
    root = tmp_path / "shards"
    classes = _write_shards(tiny_folder / "train", root / "train", corrupt="s00003")
    _write_shards(tiny_folder / "val", root / "val")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    ds = TarShards(root / "train")
    assert len(ds) == 24 and len(ds.shards) == 5
    with caplog.at_level(logging.WARNING, logger="transnext.data"):
        img, t = ds[3]  # the corrupt member: skipped, the next sample served
    assert t == 0 and len(ds.skipped) == 1 and "s00003" in caplog.text
    out = tmp_path / "o"
    assert main(["train", "--dataset", "shards", "--data-dir", str(root), "--model", model_name,
                 "--output", str(out), "--epochs", "1", "--input-size", "32", "--batch-size",
                 "8", "--workers", "0", "--no-progress", "--no-tensorboard"]) == 0
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["class_names"] == classes and ck["metrics"]["val_count"] == 9
    js = tmp_path / "e.json"
    assert main(["eval", "--dataset", "shards", "--data-dir", str(root), "--model", model_name,
                 "--checkpoint", str(out / "last.pth"), "--input-size", "32", "--workers", "0",
                 "--json", str(js)]) == 0
    row = json.loads(js.read_text())["rows"][0]
    assert row["count"] == 9 and row["top1"] == pytest.approx(ck["metrics"]["val_top1"])
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    (bad / "train" / "x.tar").write_bytes(b"not a tar" * 100)
    assert main(["train", "--dataset", "shards", "--data-dir", str(bad), "--model", model_name,
                 "--output", str(tmp_path / "o2"), "--epochs", "1", "--no-progress"]) == 2
    assert f"corrupt shard {bad / 'train' / 'x.tar'}" in capsys.readouterr().err
