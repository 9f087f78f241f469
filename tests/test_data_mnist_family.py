"""MNIST / Fashion-MNIST (IDX) and FEMNIST (LEAF json): tiny upstream-format files served over loopback
HTTP (download -> verify -> extract -> load), corrupt/truncated files, and the real offline MNIST copy."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import zipfile

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from fedhpro.data import DATASETS, load_dataset
from fedhpro.data.mnist_family import (FASHION_REMOTES, FEMNIST_CLASSES, IDX_FILES, MNIST_REMOTES, parse_idx)
from fedhpro.download import (ArchiveError, ChecksumError, RemoteFile, decompress, fetch, is_complete, prepare,
                              safe_extract)


SHARED = SHARED_DATA
REAL_MNIST = SHARED / "mnist"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 08 ndim, big-endian dims, data."""
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def build_idx_files(n_train=7, n_test=3, seed=0) -> tuple[dict[str, bytes], tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    tx = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    ty = rng.integers(0, 10, n_train).astype(np.uint8)
    vx = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    vy = rng.integers(0, 10, n_test).astype(np.uint8)
    files = {name: gzip.compress(idx_bytes(a), mtime=0) for name, a in zip(IDX_FILES, (tx, ty, vx, vy))}
    return files, (tx, ty, vx, vy)


def test_specs_registered():
    m, f, fe = DATASETS["mnist"], DATASETS["fashion_mnist"], DATASETS["femnist"]
    assert m.downloads == MNIST_REMOTES and f.downloads == FASHION_REMOTES and fe.downloads == ()
    assert [r.filename for r in m.downloads] == list(IDX_FILES)
    assert m.downloads[0].url == "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    assert m.downloads[0].md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert f.downloads[0].url == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz"
    assert [r.md5 for r in f.downloads] == ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                            "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]
    assert (m.num_classes, m.train_size, m.default_model, m.default_augment) == (10, 60000, "cnn", "none")
    assert (fe.num_classes, fe.domains, fe.default_model) == (62, ("writers",), "cnn")


@pytest.mark.parametrize("name,remotes", [("mnist", MNIST_REMOTES), ("fashion_mnist", FASHION_REMOTES)])
def test_idx_over_http(server, tmp_path, name, remotes):
    files, (tx, ty, vx, vy) = build_idx_files(seed=len(name))
    for fname, data in files.items():
        server.add(f"/up/{fname}", data)
    root = tmp_path / "data"
    # the upstream md5 is enforced: the tiny files are refused without configured checksums
    with pytest.raises(ChecksumError, match=remotes[0].md5):
        prepare(remotes, root, name, mirror={"*": server.url("/up/")}, backoff=0)
    assert not (root / name / "raw" / IDX_FILES[0]).exists()
    mirror = {f: {"url": server.url(f"/up/{f}"), "checksum": f"md5:{md5(d)}"} for f, d in files.items()}
    raw = prepare(remotes, root, name, mirror=mirror, backoff=0)
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(IDX_FILES)
    data = load_dataset(name, root)
    assert data.train_x.shape == (7, 1, 28, 28) and data.test_x.shape == (3, 1, 28, 28)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert np.array_equal(data.train_x[:, 0].numpy(), tx) and np.array_equal(data.train_y.numpy(), ty)
    assert np.array_equal(data.test_x[:, 0].numpy(), vx) and np.array_equal(data.test_y.numpy(), vy)
    assert data.mean == ((0.1307,) if name == "mnist" else (0.2860,))
    assert data.num_classes == 10 and len(data.class_names) == 10
    # decompressed files (same names without .gz) in a folder given as path= work as well
    plain = tmp_path / "plain"
    for f in IDX_FILES:
        decompress(raw / f, plain / f[:-3])
    again = load_dataset(name, tmp_path / "elsewhere", path=str(plain))
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


def test_idx_corrupt_and_truncated(server, tmp_path):
    files, _ = build_idx_files()
    good = files[IDX_FILES[0]]
    # a corrupted transfer fails the checksum: nothing appears under the final name
    server.add("/bad.gz", good[:-10] + b"\0" * 10)
    remote = RemoteFile(server.url("/bad.gz"), IDX_FILES[0], md5=md5(good))
    with pytest.raises(ChecksumError):
        fetch(remote, tmp_path / "raw", backoff=0)
    assert not (tmp_path / "raw" / IDX_FILES[0]).exists()
    # a truncated gzip (even one whose own checksum was configured) is refused when read or decompressed
    raw = tmp_path / "data" / "mnist" / "raw"
    raw.mkdir(parents=True)
    for f, d in files.items():
        (raw / f).write_bytes(d)
    (raw / IDX_FILES[0]).write_bytes(good[: len(good) // 2])
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        load_dataset("mnist", tmp_path / "data")
    with pytest.raises(ArchiveError):
        decompress(raw / IDX_FILES[0], tmp_path / "out" / "x")
    assert not (tmp_path / "out" / "x").exists()
    # an IDX payload shorter than its header says, a wrong magic, a wrong element type
    whole = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ArchiveError, match="truncated"):
        parse_idx(whole[:-1])
    with pytest.raises(ArchiveError, match="magic"):
        parse_idx(b"\x01" + whole[1:])
    with pytest.raises(ArchiveError, match="element type"):
        parse_idx(whole[:2] + b"\x0d" + whole[3:])
    (raw / IDX_FILES[0]).write_bytes(gzip.compress(whole[:-5]))
    with pytest.raises(ArchiveError, match="truncated"):
        load_dataset("mnist", tmp_path / "data")
    (raw / IDX_FILES[0]).unlink()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path / "data")


def test_real_mnist_through_mirror(tmp_path):
    if not (REAL_MNIST / IDX_FILES[0]).is_file():
        pytest.skip(f"{REAL_MNIST} not available")
    # the shared train-images .gz is recompressed: the upstream md5 refuses it ...
    with pytest.raises(ChecksumError, match="f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        prepare(MNIST_REMOTES[:1], tmp_path / "strict", "mnist", mirror={"*": str(REAL_MNIST) + "/"}, backoff=0)
    # ... its own checksum is configured; the other three files verify against the upstream md5s
    raw = prepare(MNIST_REMOTES, tmp_path, "mnist", backoff=0, mirror={
        "*": str(REAL_MNIST) + "/",
        IDX_FILES[0]: {"url": str(REAL_MNIST / IDX_FILES[0]), "checksum": "md5:c7dfcf1bfd3481a40f7b3aedbdbd083c"}})
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(IDX_FILES)
    data = load_dataset("mnist", tmp_path)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(data.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert data.train_y[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert abs(data.train_x.float().mean().item() / 255 - 0.1307) < 1e-3


# ----------------------------------------------------------------------------- FEMNIST (LEAF json)


def leaf_doc(users: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    return json.dumps({"users": list(users), "num_samples": [len(y) for _, y in users.values()],
                       "user_data": {u: {"x": x.tolist(), "y": y.tolist()} for u, (x, y) in users.items()}}).encode()


def build_leaf(seed=0):
    """Two train json files and one test file in LEAF's layout, plus the expected arrays."""
    rng = np.random.default_rng(seed)

    def user(n):
        pix = rng.integers(0, 256, (n, 784)).astype(np.float64) / 255.0
        return pix, rng.integers(0, 62, n)

    train1 = {"f0001_41": user(5), "f0002_07": user(3)}
    train2 = {"f0103_12": user(4)}
    test = {"f0001_41": user(2), "f0002_07": user(1), "f0103_12": user(2)}
    files = {"femnist/data/train/all_data_0_niid_0_keep_0_train_9.json": leaf_doc(train1),
             "femnist/data/train/all_data_1_niid_0_keep_0_train_9.json": leaf_doc(train2),
             "femnist/data/test/all_data_0_niid_0_keep_0_test_9.json": leaf_doc(test)}
    return files, {**train1, **train2}, test


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_femnist_leaf_over_http(server, tmp_path):
    files, train, test = build_leaf()
    archive = zip_bytes(files)
    server.add("/leaf/femnist.zip", archive)
    remote = RemoteFile(server.url("/leaf/femnist.zip"), "femnist.zip", sha256=hashlib.sha256(archive).hexdigest())
    root = tmp_path / "data"
    got = fetch(remote, root / "femnist" / "raw", backoff=0)
    safe_extract(got, root / "femnist" / "extracted")
    assert is_complete(root / "femnist" / "extracted")
    data = load_dataset("femnist", root, path=str(root / "femnist" / "extracted"))
    xs = np.concatenate([x for x, _ in train.values()])
    assert data.train_x.shape == (12, 1, 28, 28) and data.test_x.shape == (5, 1, 28, 28)
    assert np.array_equal(data.train_x.numpy().reshape(12, 784), np.rint(xs * 255).astype(np.uint8))
    assert data.train_y.tolist() == np.concatenate([y for _, y in train.values()]).tolist()
    assert data.num_classes == 62 and data.class_names == FEMNIST_CLASSES
    # writers: ids in order of appearance; every sample carries its writer
    assert data.domain_names == ("f0001_41", "f0002_07", "f0103_12")
    assert data.train_domain.tolist() == [0] * 5 + [1] * 3 + [2] * 4 and data.test_domain is None
    # straight from the archive in raw/ (no path=), cached afterwards
    again = load_dataset("femnist", root)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.train_domain, data.train_domain)
    assert len(list((root / "femnist" / "cache").glob("*.npz"))) == 2  # one per source (folder, zip)
    assert torch.equal(load_dataset("femnist", root).test_y, data.test_y)
    # the natural split: whole writers per client
    from fedhpro.partition import partition_domains

    parts = partition_domains(data.train_domain, num_clients=2, seed=0)
    owners = [set(data.train_domain[p].tolist()) for p in parts]
    assert owners[0].isdisjoint(owners[1]) and set().union(*owners) == {0, 1, 2}


def test_femnist_errors(server, tmp_path):
    files, _, _ = build_leaf()
    archive = zip_bytes(files)
    bad = tmp_path / "femnist.zip"
    bad.write_bytes(archive[: len(archive) // 2])
    with pytest.raises(ArchiveError):
        safe_extract(bad, tmp_path / "out")
    assert not is_complete(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises((ArchiveError, FileNotFoundError)):
        load_dataset("femnist", tmp_path / "data", path=str(bad))
    # a truncated json file inside a good folder
    tree = tmp_path / "tree"
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    first = tree / next(iter(files))
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(ArchiveError, match="not valid LEAF json"):
        load_dataset("femnist", tmp_path / "data", path=str(tree), cache=False)
    with pytest.raises(FileNotFoundError, match="preprocess.sh"):
        load_dataset("femnist", tmp_path / "empty")


def test_femnist_run_with_writer_clients(tmp_path):
    """partition: domains on FEMNIST gives natural writer clients in a real (tiny) run."""
    from fedhpro.config import from_dict
    from fedhpro.train import train

    files, _, _ = build_leaf()
    root = tmp_path / "data" / "femnist"
    for name, data in files.items():
        (root / name.split("femnist/data/")[1]).parent.mkdir(parents=True, exist_ok=True)
        (root / name.split("femnist/data/")[1]).write_bytes(data)
    cfg = from_dict({"dataset": "femnist", "data_root": str(tmp_path / "data"), "method": "fedavg",
                     "partition": "domains", "alpha": None, "num_clients": 2, "rounds": 1, "batch_size": 4,
                     "device": "cpu"})
    df = train(cfg, tmp_path / "run")
    assert list(df["round"]) == [1] and (df["status"] == "finished").all()
    assert not [c for c in df.columns if c.startswith("domain_acc_")]  # no per-writer columns
