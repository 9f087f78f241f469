"""Tiny-ImageNet-200: a tiny zip in the exact cs231n layout, served over loopback HTTP, verified, read
directly and after a safe extraction; val labels from val_annotations.txt; corrupt/truncated archives."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fedhpro.data import DATASETS, load_dataset
from fedhpro.data import tinyimagenet as tiny_mod
from fedhpro.data.tinyimagenet import TINY_MEAN, TINY_REMOTE, TINY_STD, MemberSource, decode_square
from fedhpro.download import ArchiveError, ChecksumError, is_complete, prepare, safe_extract


WNIDS = ["n09246464", "n01443537", "n02124075"]  # wnids.txt order (not sorted), as upstream
SORTED = sorted(WNIDS)
VAL_LABELS = ["n02124075", "n09246464", "n02124075", "n01443537", "n09246464", "n09246464", "n02124075"]


def jpeg(rng, mode="RGB", size=64) -> tuple[bytes, np.ndarray]:
    """A random-blocks JPEG and what PIL decodes from it (RGB, C x H x W)."""
    blocks = rng.integers(0, 256, (8, 8, 3) if mode == "RGB" else (8, 8), dtype=np.uint8)
    img = Image.fromarray(blocks, mode).resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        decoded = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    return data, decoded


def build_tiny(seed=0, per_class=3, annotations=None) -> tuple[bytes, dict]:
    """tiny-imagenet-200.zip bytes in the upstream layout, and the expected arrays."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    top = "tiny-imagenet-200/"
    files[top + "wnids.txt"] = "".join(w + "\n" for w in WNIDS).encode()
    files[top + "words.txt"] = b"n01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\n" \
                               b"n09246464\tcliff, drop, drop-off\nn00001740\tentity\n"
    train = []
    for w in WNIDS:
        boxes = []
        for i in reversed(range(per_class)):  # written out of order: reading sorts by file name
            data, arr = jpeg(rng, mode="L" if (w, i) == ("n01443537", 1) else "RGB")  # one greyscale JPEG
            files[f"{top}train/{w}/images/{w}_{i}.JPEG"] = data
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
            train.append((SORTED.index(w), f"{w}_{i}.JPEG", arr))
        files[f"{top}train/{w}/{w}_boxes.txt"] = "".join(boxes).encode()
    val, lines = [], []
    for i, w in enumerate(VAL_LABELS):
        data, arr = jpeg(rng)
        files[f"{top}val/images/val_{i}.JPEG"] = data
        lines.append(f"val_{i}.JPEG\t{w}\t1\t2\t60\t61\n")
        val.append((SORTED.index(w), arr))
    files[top + "val/val_annotations.txt"] = "".join(annotations if annotations is not None else lines).encode()
    files[top + "test/images/test_0.JPEG"] = jpeg(rng)[0]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in sorted({n.rsplit("/", 1)[0] + "/" for n in files}):
            zf.writestr(d, b"")  # directory entries, as the upstream zip has
        for name, data in files.items():
            zf.writestr(name, data)
    train.sort(key=lambda t: (t[0], t[1]))
    expected = {"train_x": np.stack([a for _, _, a in train]), "train_y": np.array([c for c, _, _ in train]),
                "test_x": np.stack([a for _, a in val]), "test_y": np.array([c for c, _ in val])}
    return buf.getvalue(), expected


def check(data, expected):
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert np.array_equal(data.train_x.numpy(), expected["train_x"])
    assert np.array_equal(data.train_y.numpy(), expected["train_y"])
    assert np.array_equal(data.test_x.numpy(), expected["test_x"])
    assert np.array_equal(data.test_y.numpy(), expected["test_y"])


def test_spec():
    spec = DATASETS["tinyimagenet"]
    assert (spec.num_classes, spec.default_model, spec.default_augment, spec.train_size) == (200, "resnet10",
                                                                                           "crop_flip", 100000)
    assert spec.downloads == (TINY_REMOTE,)
    assert TINY_REMOTE.url == "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    assert TINY_REMOTE.md5 == "90528d7ca1a48142e341f4ef8d21d0de"


def test_download_verify_extract_load(server, tmp_path, monkeypatch):
    blob, expected = build_tiny()
    server.add("/cs231n/tiny-imagenet-200.zip", blob)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match=TINY_REMOTE.md5):  # the upstream md5 is enforced
        prepare([TINY_REMOTE], root, "tinyimagenet", mirror={"*": server.url("/cs231n/")}, backoff=0)
    assert not (root / "tinyimagenet" / "raw" / TINY_REMOTE.filename).exists()
    checksum = "md5:" + hashlib.md5(blob).hexdigest()
    raw = prepare([TINY_REMOTE], root, "tinyimagenet", backoff=0, mirror={TINY_REMOTE.filename: {
        "url": server.url("/cs231n/tiny-imagenet-200.zip"), "checksum": checksum}})
    assert (raw / TINY_REMOTE.filename).read_bytes() == blob

    data = load_dataset("tinyimagenet", root)  # straight from the zip, no extraction
    check(data, expected)
    assert data.train_x.shape == (9, 3, 64, 64) and data.test_x.shape == (7, 3, 64, 64)
    assert data.class_names == tuple(SORTED) and data.num_classes == 3
    assert data.mean == TINY_MEAN and data.std == TINY_STD
    # the val labels come from val_annotations.txt (not "all class 0"): cat, cliff, cat, goldfish, ...
    assert data.test_y.tolist() == [1, 2, 1, 0, 2, 2, 1]
    assert data.train_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    g = data.train_x[1]  # the greyscale JPEG became 3 equal channels
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])

    # cached: a second load does not decode
    assert len(list((root / "tinyimagenet" / "cache").glob("*.npz"))) == 1
    monkeypatch.setattr(tiny_mod, "read_tinyimagenet", lambda *a, **k: pytest.fail("decoded again"))
    check(load_dataset("tinyimagenet", root), expected)
    monkeypatch.undo()

    # safe extraction, then from the extracted folder (found under <root>/tinyimagenet/)
    safe_extract(raw / TINY_REMOTE.filename, root / "tinyimagenet" / "extracted")
    assert is_complete(root / "tinyimagenet" / "extracted", checksum=None)
    (raw / TINY_REMOTE.filename).unlink()
    check(load_dataset("tinyimagenet", root, cache=False), expected)
    small = load_dataset("tinyimagenet", tmp_path / "x",
                         path=str(root / "tinyimagenet" / "extracted" / "tiny-imagenet-200"), image_size=32)
    assert small.train_x.shape == (9, 3, 32, 32) and small.test_y.tolist() == data.test_y.tolist()


def test_corrupt_and_truncated_archives(server, tmp_path):
    blob, _ = build_tiny(seed=1, per_class=2)
    checksum = "md5:" + hashlib.md5(blob).hexdigest()
    corrupt = bytearray(blob)
    mid = blob.index(b"train/n09246464/images/") + 200  # inside a compressed image
    corrupt[mid:mid + 16] = bytes(16)
    truncated = blob[: len(blob) // 2]
    for label, body in (("corrupt", bytes(corrupt)), ("truncated", truncated)):
        server.add(f"/{label}.zip", body)
        root = tmp_path / label
        with pytest.raises(ChecksumError, match="checksum mismatch"):
            prepare([TINY_REMOTE], root, "tinyimagenet", backoff=0,
                    mirror={TINY_REMOTE.filename: {"url": server.url(f"/{label}.zip"), "checksum": checksum}})
        assert not (root / "tinyimagenet" / "raw" / TINY_REMOTE.filename).exists()
        # the same bytes given locally: extraction and loading refuse them with ArchiveError
        local = tmp_path / f"{label}.zip"
        local.write_bytes(body)
        with pytest.raises(ArchiveError, match="corrupt or truncated"):
            safe_extract(local, tmp_path / f"{label}-x")
        assert not is_complete(tmp_path / f"{label}-x") and not (tmp_path / f"{label}-x").exists()
        with pytest.raises(ArchiveError, match="corrupt or truncated"):
            load_dataset("tinyimagenet", tmp_path / "d", path=str(local), cache=False)


def test_annotation_errors(tmp_path):
    lines = [f"val_{i}.JPEG\t{w}\t0\t0\t1\t1\n" for i, w in enumerate(VAL_LABELS)]
    cases = {
        "missing": (lines[:-1], "have no annotation"),
        "unknown": (lines[:2] + ["val_2.JPEG\tn99999999\t0\t0\t1\t1\n"] + lines[3:], "n99999999"),
        "extra": (lines + ["val_99.JPEG\tn01443537\t0\t0\t1\t1\n"], "missing"),
        "none": ([], "have no annotation"),
    }
    for label, (annotations, message) in cases.items():
        blob, _ = build_tiny(seed=2, per_class=1, annotations=annotations)
        path = tmp_path / f"{label}.zip"
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=message):
            load_dataset("tinyimagenet", tmp_path / "d", path=str(path), cache=False)
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip"):
        load_dataset("tinyimagenet", tmp_path / "empty")


def test_member_source_and_square_decode(tmp_path):
    img = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3) % 251)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    whole = decode_square(buf.getvalue(), 20)
    cropped = decode_square(buf.getvalue(), 20, crop=True)
    assert whole.shape == cropped.shape == (3, 20, 20)
    ref = np.asarray(img.crop((10, 0, 50, 40)).resize((20, 20), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(cropped, ref)
    with pytest.raises(ValueError, match="cannot decode image x.jpg"):
        decode_square(b"not an image", 8, name="x.jpg")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "a.txt").write_text("a")
    (tmp_path / "d" / "b.txt").write_text("b")
    assert list(MemberSource(tmp_path / "d").stream(lambda n: True)) == [("b.txt", b"b"), ("sub/a.txt", b"a")]
    (tmp_path / "junk.zip").write_bytes(b"PK not a zip")
    with pytest.raises(ArchiveError):
        MemberSource(tmp_path / "junk.zip")
