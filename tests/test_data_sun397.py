"""SUN397: a tiny SUN397.tar.gz and Partitions.zip in the real layout, served over loopback HTTP,
verified, read in one pass without extraction and after a safe extraction; partitions; errors."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fedhpro.data import DATASETS, load_dataset
from fedhpro.data import sun397 as sun_mod
from fedhpro.data.sun397 import PARTITIONS_REMOTE, SUN_REMOTE, class_display_name, read_partitions
from fedhpro.data.tinyimagenet import decode_square
from fedhpro.download import ArchiveError, ChecksumError, is_complete, prepare, safe_extract


CLASSES = ["/a/abbey", "/a/airplane_cabin", "/b/bakery/shop", "/y/youth_hostel"]
SIZES = [(96, 72), (50, 80), (64, 64), (120, 40)]


def jpeg(colour, size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def build(seed=0, drop=None):
    """(SUN397.tar.gz bytes, Partitions.zip bytes, info). Per class: 4 images; partition 01 uses
    j=0,1 for training and j=2 for testing, partition 02 j=2,3 / j=0; image j of class c is a solid
    colour (30 + 50c, 20 + 50j, 200), except one textured image."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    members: dict[str, bytes] = {"SUN397/ClassName.txt": "".join(c + "\n" for c in CLASSES).encode(),
                                 "SUN397/README.txt": b"SUN397 tiny copy\n"}
    keys = {}
    textured = None
    for c, cls in enumerate(CLASSES):
        for j in range(4):
            key = f"{cls}/sun_{''.join(rng.choice(letters, 16))}.jpg"
            keys[(c, j)] = key
            if (c, j) == (2, 1):  # a textured landscape image: checks the exact shorter-side resize + crop
                arr = rng.integers(0, 256, (45, 90, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=95)
                data = textured = buf.getvalue()
            else:
                data = jpeg((30 + 50 * c, 20 + 50 * j, 200), SIZES[(c + j) % 4])
            if (c, j) != drop:
                members["SUN397" + key] = data
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tf:
        for name in sorted(members, key=lambda n: (n.count("/"), n[::-1])):  # not in partition order
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tf.addfile(info, io.BytesIO(members[name]))

    def listing(js):
        return "".join(keys[(c, j)] + "\n" for c in range(len(CLASSES)) for j in js).encode()

    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("ClassName.txt", "".join(c + "\n" for c in CLASSES))
        zf.writestr("Training_01.txt", listing([0, 1]))
        zf.writestr("Testing_01.txt", listing([2]))
        zf.writestr("Training_02.txt", listing([2, 3]))
        zf.writestr("Testing_02.txt", listing([0]))
    return tbuf.getvalue(), zbuf.getvalue(), {"keys": keys, "textured": textured}


def colours(x: torch.Tensor) -> list[tuple[int, int]]:
    """(class, j) read back from solid colours."""
    r, g = x[:, 0].float().mean((1, 2)), x[:, 1].float().mean((1, 2))
    return [(int(round((a - 30) / 50)), int(round((b - 20) / 50))) for a, b in zip(r.tolist(), g.tolist())]


def test_spec():
    spec = DATASETS["sun397"]
    assert (spec.num_classes, spec.default_model, spec.default_augment, spec.train_size) == (397, "resnet10",
                                                                                           "crop_flip", 19850)
    assert spec.downloads == (SUN_REMOTE, PARTITIONS_REMOTE)
    assert SUN_REMOTE.url == "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz"
    assert SUN_REMOTE.md5 == "8ca2778205c41d23104230ba66911c7a" and SUN_REMOTE.sha256.startswith("f4041309")
    assert PARTITIONS_REMOTE.url.endswith("/SUN/download/Partitions.zip") and PARTITIONS_REMOTE.sha256
    assert class_display_name("/b/bakery/shop") == "bakery/shop" and class_display_name("/a/abbey") == "abbey"


def test_download_verify_load(server, tmp_path, monkeypatch):
    tar_gz, parts_zip, info = build()
    server.add("/SUN/SUN397.tar.gz", tar_gz)
    server.add("/SUN/download/Partitions.zip", parts_zip)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match=SUN_REMOTE.sha256):  # the upstream sha256 is enforced
        prepare(DATASETS["sun397"].downloads, root, "sun397", backoff=0,
                mirror={"SUN397.tar.gz": server.url("/SUN/SUN397.tar.gz")})
    assert not (root / "sun397" / "raw" / "SUN397.tar.gz").exists()
    mirror = {"SUN397.tar.gz": {"url": server.url("/SUN/SUN397.tar.gz"),
                                "checksum": "sha256:" + hashlib.sha256(tar_gz).hexdigest()},
              "Partitions.zip": {"url": server.url("/SUN/download/Partitions.zip"),
                                 "checksum": "md5:" + hashlib.md5(parts_zip).hexdigest()}}
    raw = prepare(DATASETS["sun397"].downloads, root, "sun397", mirror=mirror, backoff=0)

    data = load_dataset("sun397", root)  # from the tar.gz, one pass, no extraction
    assert data.class_names == ("abbey", "airplane_cabin", "bakery/shop", "youth_hostel") and data.num_classes == 4
    assert data.train_x.shape == (8, 3, 64, 64) and data.test_x.shape == (4, 3, 64, 64)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert data.train_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and data.test_y.tolist() == [0, 1, 2, 3]
    # partition-file order; the image -> label pairing follows the files (colours encode class and j)
    solid = [i for i in range(8) if i != 5]
    assert [colours(data.train_x)[i] for i in solid] == [(c, j) for c in range(4) for j in (0, 1) if (c, j) != (2, 1)]
    assert colours(data.test_x) == [(c, 2) for c in range(4)]
    ref = decode_square(info["textured"], 64, crop=True)  # shorter side to 64, centre crop
    assert np.array_equal(data.train_x[5].numpy(), ref)
    with Image.open(io.BytesIO(info["textured"])) as im:  # the central 45x45 square of the 90x45 image
        exact = np.asarray(im.convert("RGB").crop((22, 0, 67, 45)).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(ref, exact.transpose(2, 0, 1))
    f = data.train_x.double() / 255
    assert np.allclose(data.mean, f.mean((0, 2, 3)).numpy())

    monkeypatch.setattr(sun_mod, "read_sun397", lambda *a, **k: pytest.fail("decoded again"))
    assert torch.equal(load_dataset("sun397", root).train_x, data.train_x)
    monkeypatch.undo()
    # another official partition
    p2 = load_dataset("sun397", root, partition=2, cache=False)
    assert colours(p2.test_x) == [(c, 0) for c in range(4)] and len(p2.train_x) == 8
    with pytest.raises(ValueError, match="partition must be 1..10"):
        load_dataset("sun397", root, partition=11, cache=False)

    # after safe extraction of both archives, found under <root>/sun397/
    safe_extract(raw / "SUN397.tar.gz", root / "sun397" / "images")
    safe_extract(raw / "Partitions.zip", root / "sun397" / "partitions")
    assert is_complete(root / "sun397" / "images") and is_complete(root / "sun397" / "partitions")
    for f in raw.iterdir():
        f.unlink()
    again = load_dataset("sun397", root, cache=False)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    small = load_dataset("sun397", tmp_path / "x", path=str(root / "sun397" / "images"),
                         partitions=str(root / "sun397" / "partitions"), image_size=32, crop=False)
    assert small.train_x.shape == (8, 3, 32, 32)


def test_corrupt_truncated_missing(server, tmp_path):
    tar_gz, parts_zip, _ = build(seed=1)
    checksum = "sha256:" + hashlib.sha256(tar_gz).hexdigest()
    corrupt = bytearray(tar_gz)
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 32] = bytes(32)
    for label, body in (("corrupt", bytes(corrupt)), ("truncated", tar_gz[: len(tar_gz) // 2])):
        server.add(f"/{label}.tar.gz", body)
        with pytest.raises(ChecksumError):
            prepare([SUN_REMOTE], tmp_path / label, "sun397", backoff=0,
                    mirror={"SUN397.tar.gz": {"url": server.url(f"/{label}.tar.gz"), "checksum": checksum}})
        assert not (tmp_path / label / "sun397" / "raw" / "SUN397.tar.gz").exists()
        local = tmp_path / f"{label}.tar.gz"
        local.write_bytes(body)
        (tmp_path / "Partitions.zip").write_bytes(parts_zip)
        if label == "truncated":  # (safe_extract does not check the gzip CRC of corrupted member data)
            with pytest.raises(ArchiveError, match="corrupt or truncated"):
                safe_extract(local, tmp_path / f"{label}-x")
            assert not is_complete(tmp_path / f"{label}-x") and not (tmp_path / f"{label}-x").exists()
        with pytest.raises(ArchiveError, match="corrupt or truncated"):  # the loader checks the CRC
            load_dataset("sun397", tmp_path / "d", path=str(local), partitions=str(tmp_path / "Partitions.zip"),
                         cache=False)

    missing_tar, parts_zip, info = build(seed=2, drop=(3, 2))
    (tmp_path / "m.tar.gz").write_bytes(missing_tar)
    (tmp_path / "p.zip").write_bytes(parts_zip)
    with pytest.raises(ValueError, match=r"1 images of partition 1 are missing \(e.g. /y/youth_hostel/sun_"):
        load_dataset("sun397", tmp_path / "d", path=str(tmp_path / "m.tar.gz"), partitions=str(tmp_path / "p.zip"),
                     cache=False)
    with pytest.raises(FileNotFoundError, match="SUN397.tar.gz and Partitions.zip"):
        load_dataset("sun397", tmp_path / "empty")


def test_partition_errors(tmp_path):
    def zip_with(files):
        p = tmp_path / f"p{len(list(tmp_path.iterdir()))}.zip"
        with zipfile.ZipFile(p, "w") as zf:
            for n, t in files.items():
                zf.writestr(n, t)
        return p

    ok = {"ClassName.txt": "/a/abbey\n/b/bar\n", "Training_01.txt": "/a/abbey/sun_a.jpg\n",
          "Testing_01.txt": "/b/bar/sun_b.jpg\n"}
    assert read_partitions(zip_with({"Partitions/" + n: t for n, t in ok.items()})) == (
        ["/a/abbey", "/b/bar"], ["/a/abbey/sun_a.jpg"], ["/b/bar/sun_b.jpg"])
    with pytest.raises(ValueError, match="no Testing_01.txt"):
        read_partitions(zip_with({k: v for k, v in ok.items() if k != "Testing_01.txt"}))
    with pytest.raises(ValueError, match="not in a ClassName.txt class"):
        read_partitions(zip_with({**ok, "Testing_01.txt": "/c/cave/sun_c.jpg\n"}))
    with pytest.raises(ValueError, match="in both Training and Testing"):
        read_partitions(zip_with({**ok, "Testing_01.txt": "/a/abbey/sun_a.jpg\n"}))
