"""USPS, SVHN, SynDigits and digit_domains: tiny upstream-format files served over loopback HTTP
(download -> verify -> extract -> load), corrupt/truncated files, the real MNIST + USPS copies, and a
FedHPro run on MNIST + USPS with `partition: domains` reporting per-domain accuracy."""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import hashlib
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch
import yaml

from conftest import SHARED_DATA
from fedhpro.data import DATASETS, load_dataset, plan_downloads
from fedhpro.data.digit_domains import (IMAGENET_MEAN, IMAGENET_STD, SVHN_REMOTES, SYN_FILES, SYN_REMOTE,
                                        USPS_REMOTES, downloads_for, parse_usps, resize_images)
from fedhpro.data.mnist_family import IDX_FILES, MNIST_REMOTES
from fedhpro.download import ArchiveError, ChecksumError, decompress, is_complete, prepare, safe_extract
from fedhpro.sweep import validate_workflow_config


SHARED = SHARED_DATA
REAL = (SHARED / "mnist" / IDX_FILES[0]).is_file() and (SHARED / "usps.bz2").is_file()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ----------------------------------------------------------------------------- builders (upstream formats)


def usps_text(values: np.ndarray, labels: np.ndarray) -> bytes:
    """libsvm lines as upstream: 'label 1:v 2:v ... 256:v' with 6 decimals, labels 1..10."""
    lines = [f"{lab + 1} " + " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(row))
             for row, lab in zip(values, labels)]
    return ("\n".join(lines) + "\n").encode()


def build_usps(n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for fname, n in (("usps.bz2", n_train), ("usps.t.bz2", n_test)):
        vals = np.round(rng.uniform(-1, 1, (n, 256)), 6)
        vals[:, :3] = [-1.0, 1.0, 0.0]
        labs = rng.integers(0, 10, n)
        out[fname] = (bz2.compress(usps_text(vals, labs)), vals, labs)
    return out


def mat_bytes(x_nhwc: np.ndarray, y: np.ndarray) -> bytes:
    """An SVHN-format MATLAB v5 file: X is H x W x 3 x N uint8, y is N x 1 (10 = digit 0)."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"X": np.transpose(x_nhwc, (1, 2, 3, 0)), "y": y.reshape(-1, 1).astype(np.uint8)})
    return buf.getvalue()


def build_mat_pair(n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_train, n_test):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(1, 11, n)  # 1..10, 10 meaning the digit 0 as in SVHN
        y[0] = 10
        out.append((mat_bytes(x, y), x, y))
    return out


def idx_gz(arr: np.ndarray) -> bytes:
    import struct

    return gzip.compress(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes(), mtime=0)


def idx_arrays(rng, n_train: int, n_test: int) -> tuple[np.ndarray, ...]:
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8))


def write_all_domains(root: Path, seed=0, n=12):
    """Tiny local copies of all four domains in the single datasets' raw/ folders."""
    rng = np.random.default_rng(seed)
    mn = root / "mnist" / "raw"
    mn.mkdir(parents=True)
    for f, arr in zip(IDX_FILES, idx_arrays(rng, n, n)):
        (mn / f).write_bytes(idx_gz(arr))
    us = root / "usps" / "raw"
    us.mkdir(parents=True)
    for fname, (data, _, _) in build_usps(n, n, seed).items():
        (us / fname).write_bytes(data)
    sv = root / "svhn" / "raw"
    sv.mkdir(parents=True)
    (tr, _, _), (te, _, _) = build_mat_pair(n, n, seed + 1)
    (sv / "train_32x32.mat").write_bytes(tr)
    (sv / "test_32x32.mat").write_bytes(te)
    sy = root / "syndigits" / "raw"
    sy.mkdir(parents=True)
    (tr, _, _), (te, _, _) = build_mat_pair(n, n, seed + 2)
    (sy / SYN_REMOTE.filename).write_bytes(zip_bytes({f"SynthDigits/{SYN_FILES[0]}": tr,
                                                      f"SynthDigits/{SYN_FILES[1]}": te}))


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ----------------------------------------------------------------------------- specs


def test_specs_registered():
    u, s, sy, dd = (DATASETS[n] for n in ("usps", "svhn", "syndigits", "digit_domains"))
    assert u.downloads == USPS_REMOTES and s.downloads == SVHN_REMOTES and sy.downloads == (SYN_REMOTE,)
    assert USPS_REMOTES[0].url == "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.bz2"
    assert [r.md5 for r in USPS_REMOTES] == ["ec16c51db3855ca6c91edd34d0e9b197", "8ea070ee2aca1ac39742fdd1ef5ed118"]
    assert SVHN_REMOTES[0].url == "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"
    assert [r.md5 for r in SVHN_REMOTES] == ["e26dedcc434d2e4c54c9b2d4a06d8373", "eb5a983be6a315427106f1b164d9cef3"]
    assert SYN_REMOTE.md5 is None and SYN_REMOTE.sha256 is None  # no published checksum
    assert dd.domains == ("mnist", "usps", "svhn", "syn")
    assert dd.downloads == MNIST_REMOTES + USPS_REMOTES + SVHN_REMOTES + (SYN_REMOTE,)
    assert (dd.default_model, dd.default_augment, dd.num_classes) == ("resnet10", "crop_flip", 10)
    assert (u.train_size, s.train_size) == (7291, 73257)


# ----------------------------------------------------------------------------- USPS


def test_usps_over_http(server, tmp_path):
    files = build_usps()
    for fname, (data, _, _) in files.items():
        server.add(f"/libsvm/{fname}", data)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match=USPS_REMOTES[0].md5):
        prepare(USPS_REMOTES, root, "usps", mirror={"*": server.url("/libsvm/")}, backoff=0)
    prepare(USPS_REMOTES, root, "usps", backoff=0, mirror={
        f: {"url": server.url(f"/libsvm/{f}"), "checksum": f"md5:{md5(d)}"} for f, (d, _, _) in files.items()})
    data = load_dataset("usps", root)
    (_, vals, labs), (_, tvals, tlabs) = files["usps.bz2"], files["usps.t.bz2"]
    assert data.train_x.shape == (6, 1, 16, 16) and data.test_x.shape == (4, 1, 16, 16)
    assert data.train_y.tolist() == labs.tolist() and data.test_y.tolist() == tlabs.tolist()  # 1..10 -> 0..9
    # torchvision's conversion: uint8((v + 1) / 2 * 255) in float32
    expect = ((vals.astype(np.float32) + 1) / 2 * 255).astype(np.uint8).reshape(-1, 1, 16, 16)
    assert np.array_equal(data.train_x.numpy(), expect)
    assert data.train_x[0, 0, 0, :3].tolist() == [0, 255, 127]
    f = data.train_x.numpy().astype(np.float64) / 255
    assert np.isclose(data.mean[0], f.mean()) and np.isclose(data.std[0], f.std())


def test_usps_corrupt_and_truncated(tmp_path):
    files = build_usps()
    raw = tmp_path / "data" / "usps" / "raw"
    raw.mkdir(parents=True)
    good = files["usps.bz2"][0]
    (raw / "usps.bz2").write_bytes(good[: len(good) // 2])
    (raw / "usps.t.bz2").write_bytes(files["usps.t.bz2"][0])
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        load_dataset("usps", tmp_path / "data")
    with pytest.raises(ArchiveError):
        decompress(raw / "usps.bz2", tmp_path / "out" / "usps")
    assert not (tmp_path / "out" / "usps").exists()
    with pytest.raises(ArchiveError, match="label idx:value"):
        parse_usps(b"3 1:0.5 2:zz\n")
    with pytest.raises(ArchiveError, match="outside 1..256"):
        parse_usps(b"3 0:0.5\n")
    with pytest.raises(ArchiveError, match="labels outside"):
        parse_usps(b"11 1:0.5\n")
    x, y = parse_usps(b"2 3:1.0\n")  # sparse line: missing indices are 0 (grey 127)
    assert y.tolist() == [1] and x[0, 0, 0, :4].tolist() == [127, 127, 255, 127]


# ----------------------------------------------------------------------------- SVHN


def test_svhn_over_http(server, tmp_path):
    (tr, x, y), (te, tx, ty) = build_mat_pair()
    server.add("/housenumbers/train_32x32.mat", tr)
    server.add("/housenumbers/test_32x32.mat", te)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match=SVHN_REMOTES[0].md5):
        prepare(SVHN_REMOTES, root, "svhn", mirror={"*": server.url("/housenumbers/")}, backoff=0)
    prepare(SVHN_REMOTES, root, "svhn", backoff=0, mirror={
        "train_32x32.mat": {"url": server.url("/housenumbers/train_32x32.mat"), "checksum": f"md5:{md5(tr)}"},
        "test_32x32.mat": {"url": server.url("/housenumbers/test_32x32.mat"), "checksum": f"md5:{md5(te)}"}})
    data = load_dataset("svhn", root)
    assert data.train_x.shape == (5, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert np.array_equal(data.train_x.numpy(), x.transpose(0, 3, 1, 2))  # X[h, w, c, i] -> x[i, c, h, w]
    assert data.train_y.tolist() == np.where(y == 10, 0, y).tolist() and data.train_y[0] == 0
    assert np.array_equal(data.test_x.numpy(), tx.transpose(0, 3, 1, 2))
    assert data.mean == (0.4377, 0.4438, 0.4728)
    # truncated .mat (its own checksum configured, so the download passes) is refused when read
    (root / "svhn" / "raw" / "train_32x32.mat").write_bytes(tr[: len(tr) // 2])
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        load_dataset("svhn", root)


# ----------------------------------------------------------------------------- SynDigits


def test_syndigits_zip_over_http(server, tmp_path):
    (tr, x, y), (te, tx, ty) = build_mat_pair(seed=4)
    archive = zip_bytes({f"SynthDigits/{SYN_FILES[0]}": tr, f"SynthDigits/{SYN_FILES[1]}": te})
    server.add("/drive/SynthDigits.zip", archive)
    root = tmp_path / "data"
    # no published checksum: refused unless the mirror entry configures one
    with pytest.raises(ValueError, match="no checksum for SynthDigits.zip"):
        prepare((SYN_REMOTE,), root, "syndigits", mirror={"*": server.url("/drive/")}, backoff=0)
    raw = prepare((SYN_REMOTE,), root, "syndigits", backoff=0, mirror={
        "SynthDigits.zip": {"url": server.url("/drive/SynthDigits.zip"),
                            "checksum": f"sha256:{hashlib.sha256(archive).hexdigest()}"}})
    data = load_dataset("syndigits", root)  # read from the zip in raw/
    assert data.train_x.shape == (5, 3, 32, 32) and np.array_equal(data.train_x.numpy(), x.transpose(0, 3, 1, 2))
    assert data.test_y.tolist() == np.where(ty == 10, 0, ty).tolist()
    # extracted safely, the .mat files are found in the extracted folder
    safe_extract(raw / "SynthDigits.zip", tmp_path / "ex")
    assert is_complete(tmp_path / "ex")
    again = load_dataset("syndigits", tmp_path / "x", path=str(tmp_path / "ex" / "SynthDigits"))
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    # a truncated zip: extraction refused (no marker), loading refused
    bad = tmp_path / "bad" / "SynthDigits.zip"
    bad.parent.mkdir()
    bad.write_bytes(archive[: len(archive) // 2])
    with pytest.raises(ArchiveError):
        safe_extract(bad, tmp_path / "bad_ex")
    assert not is_complete(tmp_path / "bad_ex") and not (tmp_path / "bad_ex").exists()
    with pytest.raises(ArchiveError):
        load_dataset("syndigits", tmp_path / "x", path=str(bad.parent))


def test_syndigits_fpl_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    base = tmp_path / "data" / "syndigits" / "syn"
    for split, n in (("train", 2), ("val", 1)):
        for d in range(10):
            (base / split / str(d)).mkdir(parents=True)
            for j in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(base / split / str(d) / f"{j}.png")
    data = load_dataset("syndigits", tmp_path / "data")
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (10, 3, 32, 32)
    assert data.train_y.tolist() == [d for d in range(10) for _ in range(2)]


# ----------------------------------------------------------------------------- digit_domains


def test_digit_domains_all_domains(tmp_path):
    root = tmp_path / "data"
    write_all_domains(root)
    data = load_dataset("digit_domains", root, train_per_domain=5, test_per_domain=7)
    assert data.domain_names == ("mnist", "usps", "svhn", "syn")
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (28, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_domain.dtype == torch.int64
    assert data.train_domain.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert data.test_domain.tolist() == [d for d in range(4) for _ in range(7)]
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD
    # grey domains are repeated to 3 channels and resized with PIL bilinear
    grey = data.train_x[:10]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])
    mnist = load_dataset("mnist", root)
    keep = np.sort(np.random.RandomState(0).choice(12, 5, replace=False))
    assert np.array_equal(data.train_x[:5, :1].numpy(), resize_images(mnist.train_x.numpy()[keep], 32))
    assert data.train_y[:5].tolist() == mnist.train_y[keep].tolist()
    svhn = load_dataset("svhn", root)
    assert np.array_equal(data.train_x[10:15].numpy(), svhn.train_x.numpy()[keep])  # 32x32 RGB kept as is
    # cached: same arrays; the order of `domains` sets the ids; None keeps everything
    cached = load_dataset("digit_domains", root, train_per_domain=5, test_per_domain=7)
    assert torch.equal(cached.train_x, data.train_x) and torch.equal(cached.test_y, data.test_y)
    assert len(list((root / "digit_domains" / "cache").glob("*.npz"))) == 4
    two = load_dataset("digit_domains", root, domains=["syn", "mnist"], train_per_domain=None, test_per_domain=None)
    assert two.domain_names == ("syn", "mnist") and two.train_domain.bincount().tolist() == [12, 12]
    with pytest.raises(ValueError, match="domains must be"):
        load_dataset("digit_domains", root, domains=["mnist", "mnistm"])
    with pytest.raises(ValueError, match="train_per_domain"):
        load_dataset("digit_domains", root, train_per_domain=0)


def test_digit_domains_download_over_http(server, tmp_path):
    """The dataset's own downloads (MNIST, USPS, SVHN files) land in <root>/digit_domains/raw and load."""
    rng = np.random.default_rng(5)
    served = {}
    for f, arr in zip(IDX_FILES, idx_arrays(rng, 9, 6)):
        served[f] = idx_gz(arr)
    served.update({f: d for f, (d, _, _) in build_usps(9, 6, seed=5).items()})
    (tr, _, _), (te, _, _) = build_mat_pair(9, 6, seed=5)
    served.update({"train_32x32.mat": tr, "test_32x32.mat": te})
    for f, d in served.items():
        server.add(f"/mirror/{f}", d)
    root = tmp_path / "data"
    downloads = downloads_for(("mnist", "usps", "svhn"))
    with pytest.raises(ChecksumError):  # upstream checksums by default
        prepare(downloads, root, "digit_domains", mirror={"*": server.url("/mirror/")}, backoff=0)
    raw = prepare(downloads, root, "digit_domains", backoff=0, mirror={
        f: {"url": server.url(f"/mirror/{f}"), "checksum": f"md5:{md5(d)}"} for f, d in served.items()})
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(served)
    with pytest.raises(FileNotFoundError, match=r"missing domain syn: SynthDigits.zip not found in .*drop it "
                       r"explicitly with the dataset option domains: \[mnist, usps, svhn\]"):
        load_dataset("digit_domains", root)
    data = load_dataset("digit_domains", root, domains=("mnist", "usps", "svhn"))
    assert data.domain_names == ("mnist", "usps", "svhn")
    assert data.train_domain.bincount().tolist() == [9, 9, 9] and data.test_domain.bincount().tolist() == [6, 6, 6]
    assert data.train_x.shape == (27, 3, 32, 32)


def test_digit_domains_refuses_missing_domains_unless_dropped(tmp_path):
    root = tmp_path / "data"
    write_all_domains(root)
    import shutil

    shutil.rmtree(root / "svhn")
    shutil.rmtree(root / "syndigits")
    with pytest.raises(FileNotFoundError) as err:  # one line naming every missing file, nothing skipped
        load_dataset("digit_domains", root, train_per_domain=4, test_per_domain=4)
    message = str(err.value)
    assert "\n" not in message and "train_32x32.mat, test_32x32.mat" in message and "SynthDigits.zip" in message
    assert message.endswith("domains: [mnist, usps]")
    data = load_dataset("digit_domains", root, domains=["mnist", "usps"], train_per_domain=4, test_per_domain=4)
    assert data.domain_names == ("mnist", "usps") and data.train_domain.tolist() == [0] * 4 + [1] * 4
    # paths= points a domain elsewhere; files in <root>/digit_domains/raw are found too
    moved = tmp_path / "elsewhere"
    shutil.move(str(root / "usps" / "raw"), str(moved))
    (root / "digit_domains" / "raw").mkdir(parents=True)
    for f in IDX_FILES:
        shutil.move(str(root / "mnist" / "raw" / f), str(root / "digit_domains" / "raw" / f))
    d2 = load_dataset("digit_domains", root, domains=["mnist", "usps"], paths={"usps": str(moved)},
                      train_per_domain=4, test_per_domain=4, cache=False)
    assert torch.equal(d2.train_x, data.train_x)
    with pytest.raises(FileNotFoundError, match="missing domain mnist: .*or give paths="):
        load_dataset("digit_domains", tmp_path / "nothing")


# ----------------------------------------------------------------------------- real copies


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    """A data root whose mnist/ and usps/ folders link to the shared real copies."""
    if not REAL:
        pytest.skip(f"{SHARED} has no MNIST/USPS")
    root = tmp_path_factory.mktemp("real")
    (root / "mnist").mkdir()
    for f in IDX_FILES:
        (root / "mnist" / f).symlink_to(SHARED / "mnist" / f)
    (root / "usps").mkdir()
    for f in ("usps.bz2", "usps.t.bz2"):
        (root / "usps" / f).symlink_to(SHARED / f)
    return root


def test_real_usps_and_digit_domains(real_root, tmp_path):
    # the shared USPS copy is rewritten (different bytes): its own checksums are configured
    raw = prepare(USPS_REMOTES, tmp_path, "usps", backoff=0, mirror={
        "usps.bz2": {"url": str(SHARED / "usps.bz2"), "checksum": "md5:3500cd7803dd093f4d80a9d93488643d"},
        "usps.t.bz2": {"url": str(SHARED / "usps.t.bz2"), "checksum": "md5:c87ca67d78156c347030285fdb75540e"}})
    usps = load_dataset("usps", tmp_path)
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == ["usps.bz2", "usps.t.bz2"]
    assert usps.train_x.shape == (7291, 1, 16, 16) and usps.test_x.shape == (2007, 1, 16, 16)
    assert torch.bincount(usps.train_y).tolist() == [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
    assert torch.bincount(usps.test_y).tolist() == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]
    with pytest.raises(FileNotFoundError, match="missing domain svhn: .* domain syn: "):
        load_dataset("digit_domains", real_root)
    data = load_dataset("digit_domains", real_root, domains=["mnist", "usps"])  # defaults: FedBN-size subsets
    assert data.domain_names == ("mnist", "usps")
    assert data.train_x.shape == (2 * 743, 3, 32, 32) and data.test_x.shape == (2 * 1860, 3, 32, 32)
    assert data.train_domain.bincount().tolist() == [743, 743] and data.test_domain.bincount().tolist() == [1860, 1860]
    assert set(data.train_y.tolist()) == set(range(10))


def test_fedhpro_run_on_mnist_usps_domains(real_root, tmp_path, monkeypatch):
    """End to end: FedHPro, 2 rounds, `partition: domains` on MNIST + USPS, per-domain accuracy columns."""
    from fedhpro.config import from_dict
    from fedhpro.train import train

    spec = DATASETS["digit_domains"]
    # RunConfig has no dataset options: the test shrinks the loader's per-domain subsets directly
    small = functools.partial(spec.loader, train_per_domain=48, test_per_domain=60)
    monkeypatch.setitem(DATASETS, "digit_domains", dataclasses.replace(spec, loader=small))
    cfg = from_dict({"dataset": "digit_domains", "data_root": str(real_root), "method": "fedhpro", "rounds": 2,
                     "partition": "domains", "alpha": None, "num_clients": 4, "clients_per_domain": 2,
                     "model": "cnn", "batch_size": 16, "lr": 0.05, "device": "cpu",
                     "method_params": {"prototypes_per_class": 2, "matching_steps": 3, "features_per_class": 5,
                                       "feature_matching_steps": 3, "retrain_epochs": 2, "real_batch": 16}})
    with pytest.raises(FileNotFoundError, match="SynthDigits.zip"):  # the experiment declares all four
        train(cfg, tmp_path / "refused")
    assert not (tmp_path / "refused" / "metrics.parquet").exists()
    cfg = cfg.replace(dataset_options={"domains": ["mnist", "usps"]})  # dropped explicitly
    df = train(cfg, tmp_path / "run")
    assert list(df["round"]) == [1, 2] and (df["status"] == "finished").all()
    assert [c for c in df.columns if c.startswith("domain_acc_")] == ["domain_acc_mnist", "domain_acc_usps"]
    final = pd.read_parquet(tmp_path / "run" / "metrics.parquet").iloc[-1]
    for col in ("domain_acc_mnist", "domain_acc_usps"):
        assert 0.0 <= final[col] <= 1.0
    # the overall accuracy is the mean over the equally sized domain test sets
    assert np.isclose(final["test_acc"], (final["domain_acc_mnist"] + final["domain_acc_usps"]) / 2)


# ----------------------------------------------------------------------------- download step: requested domains only


def test_downloads_for_lists_only_the_requested_domains():
    assert downloads_for(("mnist", "usps")) == MNIST_REMOTES + USPS_REMOTES
    assert downloads_for(["usps", "mnist"]) == MNIST_REMOTES + USPS_REMOTES  # always in DIGIT_DOMAINS order
    assert downloads_for("svhn") == SVHN_REMOTES and downloads_for(("syn",)) == (SYN_REMOTE,)
    spec = DATASETS["digit_domains"]
    assert spec.needed_downloads({}) == spec.downloads == downloads_for()  # default: all four domains
    assert spec.needed_downloads({"domains": ["mnist", "usps"], "train_per_domain": 5}) == MNIST_REMOTES + USPS_REMOTES
    # a domain read from paths= needs no download
    assert spec.needed_downloads({"domains": ["mnist", "usps"], "paths": {"usps": "/elsewhere"}}) == MNIST_REMOTES
    with pytest.raises(ValueError, match="domains must be"):
        downloads_for(("mnist", "mnistm"))
    assert DATASETS["usps"].needed_downloads({"whatever": 1}) == USPS_REMOTES  # no hook: every file


def own_checksums(folder: Path, names) -> dict:
    """Mirror entries configuring the checksums of the copies in `folder` (their bytes differ from upstream)."""
    return {f: {"url": str(folder / f), "checksum": f"md5:{md5((folder / f).read_bytes())}"} for f in names}


def test_local_copies_count_whole_verified_domains(tmp_path):
    root = tmp_path / "data"
    write_all_domains(root)  # tiny copies in <root>/{mnist,usps,svhn,syndigits}/raw
    spec = DATASETS["digit_domains"]
    # the tiny copies fail the upstream checksums: only SynDigits (nothing to verify) counts as present
    assert spec.find_local_copies(root, spec.downloads) == {SYN_REMOTE.filename: root / "syndigits/raw/SynthDigits.zip"}
    # with the copies' own checksums configured, MNIST and USPS count (only the files asked about)
    mirror = own_checksums(root / "mnist/raw", IDX_FILES) | own_checksums(root / "usps/raw", ("usps.bz2", "usps.t.bz2"))
    local = spec.find_local_copies(root, downloads_for(("mnist", "usps", "svhn")), mirror)
    assert local == {**{f: root / "mnist/raw" / f for f in IDX_FILES},
                     "usps.bz2": root / "usps/raw/usps.bz2", "usps.t.bz2": root / "usps/raw/usps.t.bz2"}
    # one file that no longer verifies: the whole domain is fetched (the loader reads a domain from one folder)
    (root / "mnist/raw" / IDX_FILES[1]).write_bytes(idx_gz(np.zeros(3, dtype=np.uint8)))
    assert spec.find_local_copies(root, MNIST_REMOTES, mirror) == {}
    # a domain the loader reads from <root>/digit_domains/raw is left to prepare(), which verifies it there
    (root / "digit_domains").mkdir()
    (root / "usps/raw").rename(root / "digit_domains/raw")
    assert spec.find_local_copies(root, USPS_REMOTES, own_checksums(root / "digit_domains/raw", ["usps.bz2"])) == {}
    # without a hook (e.g. office_caltech): only checksum-less files placed by hand in <root>/<name>/raw/
    office = DATASETS["office_caltech"]
    assert office.find_local_copies(root, office.downloads) == {}
    (root / "office_caltech/raw").mkdir(parents=True)
    (root / "office_caltech/raw" / office.downloads[0].filename).write_bytes(b"zip")
    assert list(office.find_local_copies(root, office.downloads)) == [office.downloads[0].filename]


# ----------------------------------------------------------------------------- the workflow's download rule

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def digit_workflow(tmp_path: Path, domains, mirrors=None, data_root=None, **changes) -> Path:
    """A copy of the workflow (Snakefile, workflow/, profiles/) whose config runs FedAvg on digit_domains."""
    wf = tmp_path / "wf"
    if not wf.exists():
        wf.mkdir(parents=True)
        shutil.copy2(REPO / "Snakefile", wf / "Snakefile")
        for name in ("workflow", "profiles"):
            shutil.copytree(REPO / name, wf / name, ignore=shutil.ignore_patterns("__pycache__"))
        (wf / "config").mkdir()
    options = {"train_per_domain": 24, "test_per_domain": 20}
    if domains is not None:
        options["domains"] = list(domains)
    config = {"data_root": str(data_root or tmp_path / "data"),
              "defaults": {"rounds": 1, "batch_size": 16, "lr": 0.05, "device": "cpu", "model": "cnn",
                           "eval_every": 1, "checkpoint_every": 1},
              "datasets": {"digit_domains": {"dataset_options": options}},
              "heterogeneity": [{"partition": "domains", "num_clients": 2}],
              "methods": {"fedavg": {"default": {}}}, "seeds": [0], "mirrors": {"digit_domains": mirrors or {}},
              **changes}
    (wf / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return wf


def smk(wf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SNAKEMAKE), *args], cwd=wf, capture_output=True, text=True, timeout=600)


def planned_rules(proc: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """rule -> outputs of the jobs a dry run (-n) plans."""
    jobs: dict[str, list[str]] = {}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        line = line.strip()
        if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
            rule = line.split()[1][:-1]
            jobs.setdefault(rule, [])
        elif line.startswith("output: ") and rule:
            jobs[rule].append(line[len("output: "):])
    return jobs


def mnist_usps_files() -> dict[str, bytes]:
    """Tiny MNIST + USPS in their upstream formats (these tests are about which files the workflow fetches; the
    real copies are read by test_real_usps_and_digit_domains, and serving 60000 MNIST images cost ~20 s a test)."""
    rng = np.random.default_rng(3)
    files = {f: idx_gz(a) for f, a in zip(IDX_FILES, idx_arrays(rng, 40, 30))}
    return files | {f: d for f, (d, _, _) in build_usps(40, 30, seed=3).items()}


def serve(server, files: dict[str, bytes]) -> dict:
    """Serve `files` under /mirror/; the workflow's mirror entries (URL + the copies' own checksums)."""
    for f, d in files.items():
        server.add(f"/mirror/{f}", d)
    return {f: {"url": server.url(f"/mirror/{f}"), "checksum": f"md5:{md5(d)}"} for f, d in files.items()}


@pytest.mark.slow  # a real Snakemake workflow with downloads (~50 s on 2 workers); test_workflow_uses_local_copies_and_a_download_rerun_keeps_the_partitions keeps the domains workflow in the default suite
def test_workflow_fetches_only_the_requested_domains(server, tmp_path):
    """digit_domains with domains [mnist, usps]: the download rule fetches the MNIST and USPS files from a server
    that has nothing else (no SVHN, no SynDigits); requesting svhn later reruns it, fetching only SVHN's files."""
    files = mnist_usps_files()
    wf = digit_workflow(tmp_path, ["mnist", "usps"], serve(server, files))
    marker = tmp_path / "data" / "digit_domains" / "download.complete"
    proc = smk(wf, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_rules(proc)
    assert jobs["download"] == [str(marker)] and {"partition", "train", "aggregate"} <= set(jobs)
    proc = smk(wf, "--cores", "1", str(marker))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(r.path for r in server.requests) == sorted(f"/mirror/{f}" for f in files)
    raw = tmp_path / "data" / "digit_domains" / "raw"
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(files)
    assert [ln.split("\t")[0] for ln in marker.read_text().splitlines()[1:]] == list(files)
    # a later sweep that also requests svhn: the rule runs again (params trigger) and fetches only SVHN's files
    (tr, _, _), (te, _, _) = build_mat_pair(30, 20, seed=7)
    mirrors = serve(server, {"train_32x32.mat": tr, "test_32x32.mat": te}) | serve(server, files)
    wf = digit_workflow(tmp_path, ["mnist", "usps", "svhn"], mirrors)
    before = len(server.requests)
    proc = smk(wf, "--cores", "1", str(marker))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Params have changed" in proc.stdout + proc.stderr
    assert sorted(r.path for r in server.requests[before:]) == ["/mirror/test_32x32.mat", "/mirror/train_32x32.mat"]
    assert [ln.split("\t")[0] for ln in marker.read_text().splitlines()[1:]] == [*files, "train_32x32.mat",
                                                                                 "test_32x32.mat"]


def test_workflow_uses_local_copies_and_a_download_rerun_keeps_the_partitions(server, tmp_path):
    """MNIST already in <root>/mnist/raw (verified): not fetched, only USPS is; the partition is built on
    MNIST + USPS; a later rerun of the download step (its params changed) does not make it out of date."""
    files = mnist_usps_files()
    root = tmp_path / "data"
    (root / "mnist" / "raw").mkdir(parents=True)
    for f in IDX_FILES:
        (root / "mnist" / "raw" / f).write_bytes(files[f])
    # USPS served; MNIST only its copies' own checksums (a source that does not exist: it must not be needed)
    mirrors = serve(server, {f: files[f] for f in ("usps.bz2", "usps.t.bz2")}) | {
        f: {"url": f"/nonexistent/{f}", "checksum": f"md5:{md5(files[f])}"} for f in IDX_FILES}
    wf = digit_workflow(tmp_path, ["mnist", "usps"], mirrors)
    (run,) = validate_workflow_config(yaml.safe_load((wf / "config" / "config.yaml").read_text()))
    meta = f"results/partitions/{run.partition_id}/meta.json"
    proc = smk(wf, "--cores", "1", meta)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(r.path for r in server.requests) == ["/mirror/usps.bz2", "/mirror/usps.t.bz2"]
    marker = (root / "digit_domains" / "download.complete").read_text()
    assert f"{IDX_FILES[0]}\t{root / 'mnist' / 'raw' / IDX_FILES[0]}" in marker
    assert f"usps.bz2\t{root / 'digit_domains' / 'raw'}" in marker
    assert (wf / meta).is_file()
    # the download step's params change (here its mirrors): it reruns, the partition stays up to date
    wf = digit_workflow(tmp_path, ["mnist", "usps"], {**mirrors, "train_32x32.mat": "/nonexistent/"})
    jobs = planned_rules(smk(wf, "-n", meta))
    assert set(jobs) == {"download"}, jobs


def test_syn_without_a_source_fails_at_workflow_load(tmp_path):
    wf = digit_workflow(tmp_path, ["mnist", "syn"])
    proc = smk(wf, "-n")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    lines = [ln for ln in text.splitlines() if "invalid workflow config: mirrors.digit_domains: SynthDigits.zip" in ln]
    assert len(lines) == 1, text[-3000:]
    for part in ("no published checksum and no local copy", "mirrors: {digit_domains: {SynthDigits.zip: {url:",
                 "by hand in"):
        assert part in lines[0], lines[0]
    assert "Building DAG" not in text and not (wf / "results").exists()


def test_plan_downloads_union_and_sources(tmp_path):
    """The load-time plan of the download step (common.smk calls it with every run's dataset and options)."""
    root = tmp_path / "data"
    names = {d: [r.filename for r in downloads_for((d,))] for d in ("mnist", "usps", "svhn", "syn")}
    # the union over the runs, in the spec's order; datasets without downloads (digits) are left out
    runs = [("digit_domains", {"domains": ["usps"]}), ("digit_domains", {"domains": ["mnist", "usps"]}), ("digits", {})]
    assert plan_downloads(runs, root) == {"digit_domains": names["mnist"] + names["usps"]}
    runs = [("digit_domains", {"domains": ["svhn"]}), ("digit_domains", {"domains": ["usps"], "train_per_domain": 9})]
    assert plan_downloads(runs, root) == {"digit_domains": names["usps"] + names["svhn"]}
    # syn (explicitly, or through the default domains): no checksum, mirror or local copy -> a one-line error
    for options in ({"domains": ["mnist", "syn"]}, {}):
        with pytest.raises(ValueError) as info:
            plan_downloads([("digit_domains", options)], root)
        msg = str(info.value)
        assert msg.startswith("mirrors.digit_domains: SynthDigits.zip (needed by digit_domains with ")
        assert "\n" not in msg
        assert "mirrors: {digit_domains: {SynthDigits.zip: {url: <path or URL>, checksum: 'sha256:<hex>'}}}" in msg
        assert f"by hand in {root / 'digit_domains' / 'raw'}/" in msg
    # a mirror entry without a checksum is no source; a malformed checksum names its key; a good one is
    with pytest.raises(ValueError, match="no published checksum"):
        plan_downloads([("digit_domains", {"domains": ["syn"]})], root, {"digit_domains": {"*": "http://127.0.0.1:9/"}})
    with pytest.raises(ValueError, match=r"^mirrors\.digit_domains\.SynthDigits\.zip: checksum must be"):
        plan_downloads([("digit_domains", {"domains": ["syn"]})], root,
                       {"digit_domains": {"SynthDigits.zip": {"url": "/x", "checksum": "md5:zz"}}})
    mirror = {"digit_domains": {"SynthDigits.zip": {"url": "/x/SynthDigits.zip", "checksum": "sha256:" + "0" * 64}}}
    assert plan_downloads([("digit_domains", {"domains": ["mnist", "syn"]})], root, mirror) == {
        "digit_domains": names["mnist"] + names["syn"]}
    # a pending dataset: the file is dropped with a warning
    warned = []
    assert plan_downloads([("digit_domains", {})], root, pending={"digit_domains"}, warn=warned.append) == {
        "digit_domains": names["mnist"] + names["usps"] + names["svhn"]}
    assert len(warned) == 1 and warned[0].startswith("mirrors.digit_domains: SynthDigits.zip") \
        and warned[0].endswith("not downloaded (pending dataset)")
    # a copy present locally needs no source: here FPL's image folders in <root>/syndigits/syn/
    for split in ("train", "val"):
        (root / "syndigits" / "syn" / split / "0").mkdir(parents=True)
    assert plan_downloads([("digit_domains", {"domains": ["syn"]})], root) == {"digit_domains": names["syn"]}
    # the single dataset syndigits the same way: the zip placed by hand in <root>/syndigits/raw/
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="^mirrors.syndigits: SynthDigits.zip"):
        plan_downloads([("syndigits", {})], other)
    (other / "syndigits" / "raw").mkdir(parents=True)
    (other / "syndigits" / "raw" / "SynthDigits.zip").write_bytes(zip_bytes({SYN_FILES[0]: b"", SYN_FILES[1]: b""}))
    assert plan_downloads([("syndigits", {})], other) == {"syndigits": ["SynthDigits.zip"]}
    with pytest.raises(ValueError, match="^dataset_options of digit_domains: domains must be"):
        plan_downloads([("digit_domains", {"domains": ["mnistm"]})], root)
