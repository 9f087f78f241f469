"""Office-Caltech-10: tiny archives with the folder-name variants of the real copies, served over loopback
HTTP (download -> verify -> extract -> load), corrupt/truncated archives, the real offline tar (958 / 1123 /
157 / 295 images per domain) and a FedHPro run reporting per-domain accuracy."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import tarfile
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from fedhpro.data import DATASETS, load_dataset
from fedhpro.data.imagefolder import decode_image
from fedhpro.data.office import (OFFICE_CLASSES, OFFICE_COUNTS, OFFICE_DOMAINS, OFFICE_REMOTE, fpl_split,
                                 parse_member)
from fedhpro.download import ArchiveError, is_complete, prepare, safe_extract


SHARED = SHARED_DATA
REAL_TAR = SHARED / "office-caltech10-images.tar"
REAL_MD5 = "705926e90126d1d7414f52d53845864e"


def jpeg(rng, size=(40, 30), mode="RGB") -> bytes:
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG")
    return buf.getvalue()


# folder names as the different copies spell them: domain folder, class folder per canonical class
VARIANTS = {
    "amazon": ("amazon", {"back_pack": "back_pack", "laptop_computer": "laptop_computer", "mug": "mug"}),
    "caltech": ("Caltech10", {"back_pack": "backpack", "laptop_computer": "laptop", "mug": "Mug"}),
    "dslr": ("DSLR", {"back_pack": "BACK_PACK", "laptop_computer": "Laptop_Computer", "mug": "mug"}),
    "webcam": ("webcam", {"back_pack": "back-pack", "laptop_computer": "laptop", "mug": "mug"}),
}


def build_office(prefix="office_caltech_10/", per_class=(4, 3, 6), seed=0, domains=OFFICE_DOMAINS):
    """{member name: bytes} in FedBN's layout with name variants, plus the expected per-domain items."""
    rng = np.random.default_rng(seed)
    files, expected = {}, {}
    for domain in domains:
        dname, classes = VARIANTS[domain]
        items = []
        for (canon, folder), n in zip(classes.items(), per_class):
            for j in rng.permutation(n):  # written in shuffled order: reading must sort by name
                name = f"{prefix}{dname}/{folder}/frame_{j:04d}.jpg"
                data = jpeg(rng, mode="L" if j == 0 else "RGB")  # a grey image is converted to RGB
                files[name] = data
                items.append((OFFICE_CLASSES.index(canon), f"frame_{j:04d}.jpg", data))
        expected[domain] = sorted(items)
    files[f"{prefix}amazon_train.pkl"] = b"not an image"
    files[f"{prefix}amazon/ruler/frame_0001.jpg"] = jpeg(rng)  # a class outside the ten: ignored
    return files, expected


def zip_bytes(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(files, mode="w"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def expected_arrays(items, size=32):
    x = np.stack([decode_image(d, size, 3) for _, _, d in items])
    y = np.array([c for c, _, _ in items])
    tr, te = fpl_split(len(items))
    return x[tr], y[tr], x[te], y[te]


def test_spec_and_name_matching():
    spec = DATASETS["office_caltech"]
    assert spec.domains == ("amazon", "caltech", "dslr", "webcam") and spec.downloads == (OFFICE_REMOTE,)
    assert OFFICE_REMOTE.md5 is None and OFFICE_REMOTE.sha256 is None  # no published checksum
    assert (spec.default_model, spec.default_augment, spec.num_classes) == ("resnet10", "crop_flip", 10)
    assert parse_member("images/caltech10/backpack/a.jpg") == ("caltech", "back_pack")
    assert parse_member("Office_Caltech_10/Caltech/laptop/a.jpg") == ("caltech", "laptop_computer")
    assert parse_member("domain_adaptation_images/amazon/images/back_pack/frame_0001.jpg") == ("amazon", "back_pack")
    assert parse_member("caltech256/003.backpack/003_0001.jpg") == ("caltech", "back_pack")
    assert parse_member("amazon/images/ruler/x.jpg") is None and parse_member("x/mug/a.jpg") is None
    assert fpl_split(12)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11] and fpl_split(12)[1].tolist() == [8, 9]


def test_office_zip_over_http(server, tmp_path):
    files, expected = build_office()
    archive = zip_bytes(files)
    server.add("/fedbn/office_caltech_10_dataset.zip", archive)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="no checksum for office_caltech_10_dataset.zip"):
        prepare((OFFICE_REMOTE,), root, "office_caltech", mirror={"*": server.url("/fedbn/")}, backoff=0)
    raw = prepare((OFFICE_REMOTE,), root, "office_caltech", backoff=0, mirror={
        OFFICE_REMOTE.filename: {"url": server.url("/fedbn/office_caltech_10_dataset.zip"),
                                 "checksum": "md5:" + hashlib.md5(archive).hexdigest()}})
    data = load_dataset("office_caltech", root)  # the zip in raw/, read without extraction
    assert data.domain_names == OFFICE_DOMAINS and data.class_names == OFFICE_CLASSES
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    start = start_t = 0
    for did, domain in enumerate(OFFICE_DOMAINS):
        tx, ty, vx, vy = expected_arrays(expected[domain])
        n, m = len(ty), len(vy)
        assert (n, m) == (11, 2)  # 13 images: FPL's i % 10 < 8 rule
        assert np.array_equal(data.train_x[start:start + n].numpy(), tx)
        assert data.train_y[start:start + n].tolist() == ty.tolist()
        assert np.array_equal(data.test_x[start_t:start_t + m].numpy(), vx)
        assert data.test_y[start_t:start_t + m].tolist() == vy.tolist()
        assert set(data.train_domain[start:start + n].tolist()) == {did}
        assert set(data.test_domain[start_t:start_t + m].tolist()) == {did}
        start, start_t = start + n, start_t + m
    assert data.train_x.shape == (44, 3, 32, 32) and data.train_x.dtype == torch.uint8
    # extracted safely, the folder gives the same arrays; image_size and caps are options
    safe_extract(raw / OFFICE_REMOTE.filename, tmp_path / "ex")
    assert is_complete(tmp_path / "ex")
    again = load_dataset("office_caltech", tmp_path / "x", path=str(tmp_path / "ex"), cache=False)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_domain, data.test_domain)
    small = load_dataset("office_caltech", root, image_size=16, domains=["webcam", "dslr"], train_per_domain=5)
    assert small.train_x.shape == (10, 3, 16, 16) and small.domain_names == ("webcam", "dslr")
    assert small.test_x.shape == (4, 3, 16, 16) and small.train_domain.tolist() == [0] * 5 + [1] * 5
    assert len(list((root / "office_caltech" / "cache").glob("*.npz"))) == 6  # 4 domains at 32, 2 at 16


def test_office31_layout_tar_and_missing_domain(tmp_path):
    files, expected = build_office(prefix="domain_adaptation_images/", domains=("amazon", "webcam"))
    # Office-31 puts the classes under <domain>/images/
    files = {k.replace("/amazon/", "/amazon/images/").replace("/webcam/", "/webcam/images/"): v
             for k, v in files.items()}
    archive = tmp_path / "office31.tar.gz"
    archive.write_bytes(tar_bytes(files, "w:gz"))
    with pytest.warns(UserWarning, match="no images of the domains caltech, dslr"):
        data = load_dataset("office_caltech", tmp_path / "data", path=str(archive))
    assert data.domain_names == ("amazon", "webcam")
    tx, ty, _, _ = expected_arrays(expected["webcam"])
    assert np.array_equal(data.train_x[data.train_domain == 1].numpy(), tx)
    with pytest.raises(FileNotFoundError, match="no images of the Office-Caltech-10 domains"):
        load_dataset("office_caltech", tmp_path / "data", path=str(archive), domains=["dslr"])
    with pytest.raises(ValueError, match="domains must be"):
        load_dataset("office_caltech", tmp_path / "data", path=str(archive), domains=["clipart"])
    with pytest.raises(FileNotFoundError, match="no checksummed public download"):
        load_dataset("office_caltech", tmp_path / "empty")


def test_office_corrupt_and_truncated(tmp_path):
    files, _ = build_office(per_class=(2, 2, 2))
    whole = tar_bytes(files, "w:gz")
    bad = tmp_path / "raw" / "office.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ArchiveError):
        safe_extract(bad, tmp_path / "ex")
    assert not is_complete(tmp_path / "ex") and not (tmp_path / "ex").exists()
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        load_dataset("office_caltech", tmp_path / "data", path=str(bad))
    assert not (tmp_path / "data" / "office_caltech" / "cache").exists()  # nothing cached from a bad archive
    # an undecodable image inside a good archive names the member
    files["office_caltech_10/amazon/mug/broken.jpg"] = b"\xff\xd8 not a jpeg"
    tree = tmp_path / "broken.tar"
    tree.write_bytes(tar_bytes(files))
    with pytest.raises(ValueError, match="broken.jpg"):
        load_dataset("office_caltech", tmp_path / "data", path=str(tree))


# ----------------------------------------------------------------------------- the real offline copy


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    if not REAL_TAR.is_file():
        pytest.skip(f"{REAL_TAR} not available")
    root = tmp_path_factory.mktemp("office")
    # the pipeline's download step with the local copy: a mirror entry with the copy's own checksum
    raw = prepare((OFFICE_REMOTE,), root, "office_caltech", backoff=0, mirror={OFFICE_REMOTE.filename: {
        "url": str(REAL_TAR), "checksum": f"md5:{REAL_MD5}", "filename": REAL_TAR.name}})
    assert [p.name for p in raw.iterdir() if not p.name.startswith(".")] == [REAL_TAR.name]
    return root


def test_real_office_caltech_counts(real_root):
    t0 = time.perf_counter()
    data = load_dataset("office_caltech", real_root)
    first = time.perf_counter() - t0
    assert data.domain_names == OFFICE_DOMAINS
    totals = (data.train_domain.bincount(minlength=4) + data.test_domain.bincount(minlength=4)).tolist()
    assert totals == [OFFICE_COUNTS[d] for d in OFFICE_DOMAINS] == [958, 1123, 157, 295]
    for did, d in enumerate(OFFICE_DOMAINS):
        n = OFFICE_COUNTS[d]
        assert int((data.train_domain == did).sum()) == len(fpl_split(n)[0])
        assert set(data.train_y[data.train_domain == did].tolist()) == set(range(10))
        assert set(data.test_y[data.test_domain == did].tolist()) == set(range(10))
    assert data.train_x.shape == (2031, 3, 32, 32) and data.test_x.shape == (502, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.test_y.dtype == torch.int64
    t0 = time.perf_counter()
    again = load_dataset("office_caltech", real_root)
    second = time.perf_counter() - t0
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_domain, data.test_domain)
    # the cache is what makes it fast (a third of the decode); 15 s: a margin for a loaded machine (pytest-xdist)
    assert second < 15.0 and second < first / 3, (first, second)


def test_fedhpro_run_on_office_caltech(real_root, tmp_path, monkeypatch):
    """End to end: FedHPro, 2 rounds, one client per domain, per-domain accuracy columns."""
    from fedhpro.config import from_dict
    from fedhpro.train import train

    spec = DATASETS["office_caltech"]
    # RunConfig has no dataset options: the test shrinks the loader's per-domain subsets directly
    small = functools.partial(spec.loader, train_per_domain=30, test_per_domain=25)
    monkeypatch.setitem(DATASETS, "office_caltech", dataclasses.replace(spec, loader=small))
    cfg = from_dict({"dataset": "office_caltech", "data_root": str(real_root), "method": "fedhpro", "rounds": 2,
                     "partition": "domains", "alpha": None, "num_clients": 4, "model": "cnn", "batch_size": 16,
                     "lr": 0.05, "device": "cpu",
                     "method_params": {"prototypes_per_class": 2, "matching_steps": 3, "features_per_class": 5,
                                       "feature_matching_steps": 3, "retrain_epochs": 2, "real_batch": 16}})
    df = train(cfg, tmp_path / "run")
    assert list(df["round"]) == [1, 2] and (df["status"] == "finished").all()
    cols = [c for c in df.columns if c.startswith("domain_acc_")]
    assert cols == [f"domain_acc_{d}" for d in OFFICE_DOMAINS]
    final = pd.read_parquet(tmp_path / "run" / "metrics.parquet").iloc[-1]
    assert all(0.0 <= final[c] <= 1.0 for c in cols)
    assert np.isclose(final["test_acc"], np.mean([final[c] for c in cols]))  # 25 test images per domain
