"""CIFAR-10/100 and imagefolder loaders: upstream-format archives built here and served over
loopback HTTP, hand-made image folders/tars, and the real offline CIFAR-10 JPEG copy."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from fedhpro.data import DATASETS, load_dataset
from fedhpro.data import imagefolder as imagefolder_mod
from fedhpro.data.cifar import CIFAR10_CLASSES, CIFAR10_REMOTE, CIFAR100_REMOTE, CIFAR_MEAN, CIFAR_STD
from fedhpro.download import ChecksumError, fetch, is_complete, prepare, safe_extract


REAL_CIFAR = SHARED_DATA / "cifar10-jpeg.tar"


# ----------------------------------------------------------------------------- upstream python format


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)  # upstream files are Python 2 protocol-2 pickles


def _tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def build_cifar10_archive(path: Path, per_batch=4, n_test=5, seed=0):
    """A tiny archive in the exact layout of cifar-10-python.tar.gz; returns it and the expected arrays."""
    rng = np.random.default_rng(seed)
    files, xs, ys = {}, [], []
    batch_order = [4, 1, 3, 5, 2]  # member order in the tar differs from the reading order on purpose
    batches = {}
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches[i] = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
                      b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)]}
        xs.append(x)
        ys.append(y)
    files["cifar-10-batches-py/readme.html"] = b"<html></html>"
    for i in batch_order:
        files[f"cifar-10-batches-py/data_batch_{i}"] = _pickle(batches[i])
    tx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    ty = [int(v) for v in rng.integers(0, 10, n_test)]
    files["cifar-10-batches-py/test_batch"] = _pickle({b"batch_label": b"testing batch 1 of 1", b"labels": ty,
                                                       b"data": tx, b"filenames": [b"t.png"] * n_test})
    files["cifar-10-batches-py/batches.meta"] = _pickle({b"num_cases_per_batch": per_batch,
                                                         b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                                         b"num_vis": 3072})
    _tar_gz(path, files)
    expected = (np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys), tx.reshape(-1, 3, 32, 32),
                np.array(ty))
    return path, expected


def _str_keys(obj):
    """What Python 3's `pickle.dump` of a re-made CIFAR dict holds: str keys and names."""
    if isinstance(obj, dict):
        return {k.decode(): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [v.decode() if isinstance(v, bytes) else v for v in obj]
    return obj


def test_cifar10_python3_pickles_read_like_upstream(tmp_path):
    """A copy re-pickled by Python 3 (str keys, default protocol) gives the same arrays as upstream's
    Python-2 pickles (bytes keys): both codes of the parity harness read one set of files."""
    archive, expected = build_cifar10_archive(tmp_path / "up" / "cifar-10-python.tar.gz")
    folder = tmp_path / "py3" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with tarfile.open(archive) as tf:
        for m in tf:
            if m.isfile() and not m.name.endswith(".html"):
                obj = pickle.loads(tf.extractfile(m).read(), encoding="bytes")
                (folder / Path(m.name).name).write_bytes(pickle.dumps(_str_keys(obj)))
    assert isinstance(next(iter(pickle.loads((folder / "test_batch").read_bytes()))), str)
    from fedhpro.data.cifar import read_python

    arrays = read_python(folder.parent)
    tx, ty, vx, vy = expected
    assert np.array_equal(arrays.train_x, tx) and np.array_equal(arrays.train_y, ty)
    assert np.array_equal(arrays.test_x, vx) and np.array_equal(arrays.test_y, vy)
    assert tuple(arrays.class_names) == CIFAR10_CLASSES


def build_cifar100_archive(path: Path, n_train=7, n_test=3, seed=1):
    rng = np.random.default_rng(seed)
    fine_names = [f"class_{i:03d}" for i in range(100)]
    x = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, 100, n_train)]
    tx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    ty = [int(v) for v in rng.integers(0, 100, n_test)]
    files = {
        "cifar-100-python/file.txt~": b"",
        "cifar-100-python/train": _pickle({b"filenames": [b"a.png"] * n_train, b"batch_label": b"training batch 1 of 1",
                                           b"fine_labels": y, b"coarse_labels": [v // 5 for v in y], b"data": x}),
        "cifar-100-python/test": _pickle({b"filenames": [b"b.png"] * n_test, b"batch_label": b"testing batch 1 of 1",
                                          b"fine_labels": ty, b"coarse_labels": [v // 5 for v in ty], b"data": tx}),
        "cifar-100-python/meta": _pickle({b"fine_label_names": [n.encode() for n in fine_names],
                                          b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}),
    }
    _tar_gz(path, files)
    return path, (x.reshape(-1, 3, 32, 32), np.array(y), tx.reshape(-1, 3, 32, 32), np.array(ty)), fine_names


def assert_arrays(data, expected):
    tx, ty, vx, vy = expected
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert np.array_equal(data.train_x.numpy(), tx) and np.array_equal(data.train_y.numpy(), ty)
    assert np.array_equal(data.test_x.numpy(), vx) and np.array_equal(data.test_y.numpy(), vy)


def test_specs_registered():
    c10, c100, img = DATASETS["cifar10"], DATASETS["cifar100"], DATASETS["imagefolder"]
    assert (c10.num_classes, c10.default_model, c10.default_augment, c10.train_size) == (10, "resnet10",
                                                                                       "crop_flip", 50000)
    assert c10.downloads == (CIFAR10_REMOTE,) and c100.downloads == (CIFAR100_REMOTE,)
    assert CIFAR10_REMOTE.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert CIFAR10_REMOTE.md5 == "c58f30108f718f92721af3b95e74349a"
    assert CIFAR100_REMOTE.md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert (c100.num_classes, c100.train_size, c100.default_augment) == (100, 50000, "crop_flip")
    assert (img.num_classes, img.default_model) == (0, "resnet10")


def test_cifar10_python_archive_over_http(server, tmp_path):
    archive, expected = build_cifar10_archive(tmp_path / "build" / "cifar-10-python.tar.gz")
    archive_bytes = archive.read_bytes()
    md5 = hashlib.md5(archive_bytes).hexdigest()
    server.add("/kriz/cifar-10-python.tar.gz", archive_bytes)
    root = tmp_path / "data"
    # the upstream checksum is enforced: this tiny archive is refused without a configured one
    with pytest.raises(ChecksumError, match=CIFAR10_REMOTE.md5):
        prepare([CIFAR10_REMOTE], root, "cifar10", mirror={"*": server.url("/kriz/")}, backoff=0)
    assert not (root / "cifar10" / "raw" / "cifar-10-python.tar.gz").exists()
    raw = prepare([CIFAR10_REMOTE], root, "cifar10", backoff=0,
                  mirror={"cifar-10-python.tar.gz": {"url": server.url("/kriz/cifar-10-python.tar.gz"),
                                                     "checksum": f"md5:{md5}"}})
    downloaded = raw / "cifar-10-python.tar.gz"
    assert downloaded.read_bytes() == archive_bytes

    # straight from the downloaded archive (no extraction) ...
    data = load_dataset("cifar10", root)
    assert_arrays(data, expected)
    assert data.class_names == CIFAR10_CLASSES and data.num_classes == 10
    assert data.mean == CIFAR_MEAN and data.std == CIFAR_STD
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (5, 3, 32, 32)
    # ... and after a safe extraction, from the extracted folder
    safe_extract(downloaded, root / "cifar10" / "extracted")
    assert is_complete(root / "cifar10" / "extracted")
    downloaded.unlink()
    assert_arrays(load_dataset("cifar10", root), expected)
    assert_arrays(load_dataset("cifar10", tmp_path / "elsewhere", path=str(root / "cifar10" / "extracted")),
                  expected)
    assert_arrays(load_dataset("cifar10", tmp_path / "elsewhere",
                               path=str(root / "cifar10" / "extracted" / "cifar-10-batches-py"), source="python"),
                  expected)
    # pixel layout: row r of the 3072 vector is channel r // 1024, as upstream
    flat = np.concatenate([expected[0].reshape(-1, 3072)])
    assert np.array_equal(data.train_x[0, 1].numpy().ravel(), flat[0, 1024:2048])


def test_cifar100_python_archive_over_http(server, tmp_path):
    archive, expected, names = build_cifar100_archive(tmp_path / "cifar-100-python.tar.gz")
    server.add("/c100.tgz", archive.read_bytes())
    raw = tmp_path / "data" / "cifar100" / "raw"
    got = fetch(CIFAR100_REMOTE, raw, mirror_url=server.url("/c100.tgz"),
                checksum="sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest())
    assert got == raw / "cifar-100-python.tar.gz"
    safe_extract(got, tmp_path / "data" / "cifar100" / "extracted")
    data = load_dataset("cifar100", tmp_path / "data")
    assert_arrays(data, expected)
    assert data.num_classes == 100 and data.class_names == tuple(names)
    assert data.mean == CIFAR_MEAN and data.std == CIFAR_STD  # FedHPro uses the CIFAR-10 stats for CIFAR-100
    assert_arrays(load_dataset("cifar100", tmp_path / "x", path=str(got)), expected)


def test_python_format_errors(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", root)
    # a malicious pickle is refused, not executed
    evil = _pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": os.system})
    archive, _ = build_cifar10_archive(tmp_path / "a.tar.gz")
    with tarfile.open(archive) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    files["cifar-10-batches-py/data_batch_3"] = evil
    bad = _tar_gz(tmp_path / "bad.tar.gz", files)
    with pytest.raises(ValueError, match="not allowed"):
        load_dataset("cifar10", root, path=str(bad))
    del files["cifar-10-batches-py/data_batch_3"]
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", root, path=str(_tar_gz(tmp_path / "incomplete.tar.gz", files)))
    with pytest.raises(ValueError, match="source must be"):
        load_dataset("cifar10", root, path=str(archive), source="pickle")
    with pytest.raises(ValueError, match="folder-format"):
        load_dataset("cifar10", root, path=str(archive), source="folder")


# ----------------------------------------------------------------------------- image folders


def make_image_tree(base: Path, classes: dict[str, tuple[int, int]], size=(8, 8), mode="RGB", seed=0):
    """PNG images base/{train,test}/<class>/<name>.png; returns {split: [(class, name, array)]}."""
    rng = np.random.default_rng(seed)
    made: dict[str, list] = {"train": [], "test": []}
    for cls, counts in classes.items():
        for split, n in zip(("train", "test"), counts):
            d = base / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in rng.permutation(n):  # written in shuffled order: reading must sort by name
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(arr, mode).save(d / f"img{j:03d}.png")
                made[split].append((cls, f"img{j:03d}.png", arr))
    for split in made:
        made[split].sort(key=lambda t: (t[0], t[1]))
    return made


def expected_from(made, split, classes):
    xs = [a.transpose(2, 0, 1) if a.ndim == 3 else a[None] for _, _, a in made[split]]
    ys = [sorted(classes).index(c) for c, _, _ in made[split]]
    return np.stack(xs), np.array(ys)


def tar_tree(src: Path, archive: Path, prefix: str = "", mode="w") -> Path:
    with tarfile.open(archive, mode) as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=prefix + p.relative_to(src).as_posix(), recursive=False)
    return archive


def test_imagefolder_folder_and_tar(tmp_path):
    classes = {"zebra": (3, 2), "ant": (4, 1), "moth": (2, 2)}
    tree = tmp_path / "tree"
    made = make_image_tree(tree, classes)
    (tree / "train" / "ant" / ".DS_Store").write_bytes(b"junk")
    (tree / "train" / "ant" / "notes.txt").write_text("not an image")
    root = tmp_path / "data"
    data = load_dataset("imagefolder", root, path=str(tree), image_size=8)
    tx, ty = expected_from(made, "train", classes)
    vx, vy = expected_from(made, "test", classes)
    assert data.class_names == ("ant", "moth", "zebra") and data.num_classes == 3
    assert np.array_equal(data.train_x.numpy(), tx) and np.array_equal(data.train_y.numpy(), ty)
    assert np.array_equal(data.test_x.numpy(), vx) and np.array_equal(data.test_y.numpy(), vy)
    assert data.train_y.tolist() == [0] * 4 + [1] * 2 + [2] * 3
    f = tx.astype(np.float64) / 255.0
    assert np.allclose(data.mean, f.mean(axis=(0, 2, 3))) and np.allclose(data.std, f.std(axis=(0, 2, 3)))

    # the same tree as a compressed tar under a prefix, read without extraction
    archive = tar_tree(tree, tmp_path / "mine.tar.gz", prefix="mydata/", mode="w:gz")
    from_tar = load_dataset("imagefolder", root, path=str(archive), image_size=8, cache=False)
    for a, b in ((from_tar.train_x, data.train_x), (from_tar.test_y, data.test_y)):
        assert torch.equal(a, b)
    assert from_tar.class_names == data.class_names
    # found automatically under <root>/imagefolder/raw/
    (root / "imagefolder" / "raw").mkdir(parents=True)
    os.link(archive, root / "imagefolder" / "raw" / "mine.tar.gz")
    assert torch.equal(load_dataset("imagefolder", root, image_size=8).train_x, data.train_x)


def test_imagefolder_resize_grey_cache_and_errors(tmp_path, monkeypatch):
    classes = {"a": (2, 1), "b": (2, 1)}
    tree = tmp_path / "tree"
    make_image_tree(tree, classes, size=(20, 12))
    root = tmp_path / "data"
    data = load_dataset("imagefolder", root, path=str(tree), image_size=16, channels=1)
    assert data.train_x.shape == (4, 1, 16, 16) and len(data.mean) == 1
    assert load_dataset("imagefolder", root, path=str(tree), image_size=None).train_x.shape == (4, 3, 12, 20)
    caches = sorted((root / "imagefolder" / "cache").glob("*.npz"))
    assert len(caches) == 2 and not list((root / "imagefolder" / "cache").glob(".tmp-*"))

    # a second load is served from the cache, without decoding
    def boom(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(imagefolder_mod, "read_image_folder", boom)
    again = load_dataset("imagefolder", root, path=str(tree), image_size=16, channels=1)
    assert torch.equal(again.train_x, data.train_x) and again.class_names == ("a", "b")
    # a changed source is decoded again
    time.sleep(0.01)
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(tree / "train" / "a" / "new.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("imagefolder", root, path=str(tree), image_size=16, channels=1)
    monkeypatch.undo()

    (tree / "test" / "c").mkdir()
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(tree / "test" / "c" / "x.png")
    with pytest.raises(ValueError, match=r"\['c'\] have no train images"):
        load_dataset("imagefolder", root, path=str(tree), cache=False)
    with pytest.raises(ValueError, match="no image-folder layout"):
        load_dataset("imagefolder", root, path=str(tree / "train"), cache=False)
    with pytest.raises(FileNotFoundError, match="give path="):
        load_dataset("imagefolder", tmp_path / "empty")
    (tree / "test" / "c" / "x.png").unlink()
    (tree / "test" / "c").rmdir()
    (tree / "train" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset("imagefolder", root, path=str(tree), cache=False)


def test_cifar10_from_small_folder_tar(tmp_path):
    classes = {c: (2, 1) for c in CIFAR10_CLASSES}
    tree = tmp_path / "tree"
    made = make_image_tree(tree, classes, size=(32, 32))
    archive = tar_tree(tree, tmp_path / "cifar10-png.tar")
    root = tmp_path / "data"
    data = load_dataset("cifar10", root, path=str(archive))
    tx, ty = expected_from(made, "train", classes)
    vx, vy = expected_from(made, "test", classes)
    assert np.array_equal(data.train_x.numpy(), tx) and np.array_equal(data.train_y.numpy(), ty)
    assert np.array_equal(data.test_x.numpy(), vx) and np.array_equal(data.test_y.numpy(), vy)
    assert data.class_names == CIFAR10_CLASSES and data.mean == CIFAR_MEAN
    assert len(list((root / "cifar10" / "cache").glob("*.npz"))) == 1
    # placed in <root>/cifar10/raw/, found by content
    (root / "cifar10" / "raw").mkdir(parents=True)
    os.link(archive, root / "cifar10" / "raw" / "cifar10-png.tar")
    assert torch.equal(load_dataset("cifar10", root).test_x, data.test_x)
    with pytest.raises(ValueError, match="python-format"):
        load_dataset("cifar10", root, path=str(archive), source="python")
    # an extracted folder works as well; a wrong class count is refused
    assert torch.equal(load_dataset("cifar10", root, path=str(tree), cache=False).train_x, data.train_x)
    with pytest.raises(ValueError, match="10 class folders, cifar100 has 100"):
        load_dataset("cifar100", root, path=str(tree), cache=False)


# ----------------------------------------------------------------------------- the real offline copy


@pytest.mark.slow  # decodes the real 60,000-image tar (~35 s); the archive and image-folder readers keep fast tests on small archives here
def test_real_cifar10_jpeg_tar(tmp_path):
    if not REAL_CIFAR.is_file():
        pytest.skip(f"{REAL_CIFAR} not available")
    # what the pipeline's download step does with the offline copy: a mirror entry with the copy's
    # own checksum (its bytes differ from upstream), stored under its own name in raw/
    raw = prepare([CIFAR10_REMOTE], tmp_path, "cifar10", mirror={CIFAR10_REMOTE.filename: {
        "url": str(REAL_CIFAR), "checksum": "md5:63ef9f0d0f37ee9d39df1f47bfeb8eb8", "filename": REAL_CIFAR.name}})
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == [REAL_CIFAR.name]
    t0 = time.perf_counter()
    data = load_dataset("cifar10", tmp_path)  # found in raw/, format detected from the contents
    first = time.perf_counter() - t0
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert data.num_classes == 10 and data.class_names == CIFAR10_CLASSES
    assert torch.bincount(data.train_y, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(data.test_y, minlength=10).tolist() == [1000] * 10
    # lossy JPEG, but the pixel statistics are CIFAR-10's
    mean, std = imagefolder_mod.channel_stats(data.train_x.numpy())
    assert np.allclose(mean, CIFAR_MEAN, atol=0.01)
    assert np.allclose(std, (0.247, 0.243, 0.261), atol=0.01)  # CIFAR-10's per-pixel std
    caches = list((tmp_path / "cifar10" / "cache").glob("*.npz"))
    assert len(caches) == 1
    t0 = time.perf_counter()
    again = load_dataset("cifar10", tmp_path)
    second = time.perf_counter() - t0
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    # the cache is what makes it fast (a third of the decode); 15 s: a margin for a loaded machine (pytest-xdist)
    assert second < 15.0 and second < first / 3, (first, second)
