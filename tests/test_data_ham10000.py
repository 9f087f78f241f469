"""HAM10000: the Dataverse files (two image zips + the tab-separated metadata) built small, served over
loopback HTTP with configured checksums, loaded with the lesion-grouped split; errors."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fedhpro.data import DATASETS, load_dataset
from fedhpro.data import ham10000 as ham_mod
from fedhpro.data.ham10000 import HAM_CLASSES, HAM_REMOTES, lesion_split, parse_metadata
from fedhpro.download import ArchiveError, ChecksumError, is_complete, prepare, safe_extract


HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]


def make_rows(n_lesions=24, seed=0):
    """Metadata rows: lesions with 1-3 images each, every class present, image ids ISIC_00243xx."""
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    for lesion in range(n_lesions):
        dx = HAM_CLASSES[lesion % 7]
        for _ in range(int(rng.integers(1, 4))):
            rows.append({"lesion_id": f"HAM_{lesion:07d}", "image_id": f"ISIC_{24306 + 7 * k % 97:07d}", "dx": dx,
                         "dx_type": "histo", "age": "50.0", "sex": "male", "localization": "back",
                         "dataset": "vidir_modern", "k": k})
            k += 1
    rng.shuffle(rows)  # metadata is not in image order upstream either
    return rows


def image_bytes(k: int, dx: str) -> bytes:
    """A 4:3 JPEG, solid colour: red encodes the class, green and blue the image number k."""
    img = Image.new("RGB", (80, 60), (20 + 30 * HAM_CLASSES.index(dx), 8 * (k % 32), 32 + 64 * (k // 32)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def metadata_tab(rows) -> bytes:
    """Dataverse's ingested table: tab-separated, strings quoted."""
    lines = ["\t".join(f'"{h}"' for h in HEADER)]
    for r in rows:
        lines.append("\t".join(r[h] if h == "age" else f'"{r[h]}"' for h in HEADER))
    return ("\n".join(lines) + "\n").encode()


def metadata_csv(rows) -> bytes:
    lines = [",".join(HEADER[:7])] + [",".join(str(r[h]) for h in HEADER[:7]) for r in rows]
    return ("\n".join(lines) + "\n").encode()


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def build(rows):
    ordered = sorted(rows, key=lambda r: r["k"])
    images = {f"{r['image_id']}.jpg": image_bytes(r["k"], r["dx"]) for r in ordered}
    names = list(images)
    half = len(names) // 2
    return {"HAM10000_images_part_1.zip": zip_of({n: images[n] for n in names[:half]}),
            "HAM10000_images_part_2.zip": zip_of({n: images[n] for n in names[half:]}),
            "HAM10000_metadata.tab": metadata_tab(rows)}


def decode_ids(x: torch.Tensor, rows) -> list[str]:
    """Image ids of loaded samples, from the green and blue channels (k) of their solid colour."""
    by_k = {r["k"]: r["image_id"] for r in rows}
    g, b = x[:, 1].float().mean((1, 2)), x[:, 2].float().mean((1, 2))
    return [by_k[int(round(gi / 8)) + 32 * int(round((bi - 32) / 64))] for gi, bi in zip(g.tolist(), b.tolist())]


def test_spec():
    spec = DATASETS["ham10000"]
    assert (spec.num_classes, spec.default_model, spec.default_augment) == (7, "resnet10", "crop_flip")
    assert [r.filename for r in spec.downloads] == ["HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip",
                                                    "HAM10000_metadata.tab"]
    assert all(r.url.startswith("https://dataverse.harvard.edu/api/access/datafile/") for r in HAM_REMOTES)
    assert all(r.md5 is None and r.sha256 is None for r in HAM_REMOTES)  # not confirmed: must be configured


def test_download_split_and_load(server, tmp_path, monkeypatch):
    rows = make_rows()
    files = build(rows)
    for name, blob in files.items():
        server.add(f"/dv/{name}", blob)
    root = tmp_path / "data"
    # no checksum known: the download step refuses until one is configured
    with pytest.raises(ValueError, match="no checksum for HAM10000_images_part_1.zip"):
        prepare(HAM_REMOTES, root, "ham10000", mirror={"*": server.url("/dv/")}, backoff=0)
    mirror = {n: {"url": server.url(f"/dv/{n}"), "checksum": "sha256:" + hashlib.sha256(b).hexdigest()}
              for n, b in files.items()}
    raw = prepare(HAM_REMOTES, root, "ham10000", mirror=mirror, backoff=0)
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(files)

    data = load_dataset("ham10000", root)
    n = len(rows)
    assert data.num_classes == 7 and data.class_names == HAM_CLASSES
    assert data.train_x.shape[1:] == (3, 64, 64) and len(data.train_x) + len(data.test_x) == n
    assert data.train_x.dtype == torch.uint8 and data.test_y.dtype == torch.int64
    train_ids, test_ids = decode_ids(data.train_x, rows), decode_ids(data.test_x, rows)
    assert train_ids == sorted(train_ids) and test_ids == sorted(test_ids)  # ordered by image_id
    by_id = {r["image_id"]: r for r in rows}
    # labels: sorted dx names, and they match the pixels' class colour
    assert data.train_y.tolist() == [HAM_CLASSES.index(by_id[i]["dx"]) for i in train_ids]
    assert data.test_y.tolist() == [HAM_CLASSES.index(by_id[i]["dx"]) for i in test_ids]
    red = torch.round((data.train_x[:, 0].float().mean((1, 2)) - 20) / 30).long()
    assert torch.equal(red, data.train_y)
    # grouped by lesion: no lesion in both splits; stratified: about 20% of each class's lesions in test
    train_lesions = {by_id[i]["lesion_id"] for i in train_ids}
    test_lesions = {by_id[i]["lesion_id"] for i in test_ids}
    assert train_lesions and test_lesions and not train_lesions & test_lesions
    assert len(test_lesions) == sum(round(0.2 * len({r["lesion_id"] for r in rows if r["dx"] == c}))
                                    for c in HAM_CLASSES)
    # the split is the function's, fixed (seed 0), and another seed gives another split
    tr, te = lesion_split(parse_metadata(files["HAM10000_metadata.tab"], "m"))
    assert [r["image_id"] for r in te] == test_ids and [r["image_id"] for r in tr] == train_ids
    assert [r["image_id"] for r in lesion_split(parse_metadata(files["HAM10000_metadata.tab"], "m"),
                                                seed=1)[1]] != test_ids
    # normalisation: the training split's statistics
    f = data.train_x.double() / 255
    assert np.allclose(data.mean, f.mean((0, 2, 3)).numpy()) and np.allclose(data.std, f.std((0, 2, 3),
                                                                                              unbiased=False).numpy())
    # cached
    monkeypatch.setattr(ham_mod, "read_ham10000", lambda *a, **k: pytest.fail("decoded again"))
    assert torch.equal(load_dataset("ham10000", root).test_x, data.test_x)
    monkeypatch.undo()
    assert len(list((root / "ham10000" / "cache").glob("*.npz"))) == 1
    small = load_dataset("ham10000", root, image_size=32, crop=True)
    assert small.train_x.shape[1:] == (3, 32, 32) and torch.equal(small.train_y, data.train_y)

    # extracted image folders (Kaggle-like) with the comma-separated metadata, given by path=
    other = tmp_path / "kaggle"
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        safe_extract(raw / f"{part}.zip", other / part)
        assert is_complete(other / part)
    (other / "HAM10000_metadata.csv").write_bytes(metadata_csv(rows))
    again = load_dataset("ham10000", tmp_path / "elsewhere", path=str(other), cache=False)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


def test_corrupt_truncated_and_missing(server, tmp_path):
    rows = make_rows(n_lesions=10, seed=1)
    files = build(rows)
    good = files["HAM10000_images_part_2.zip"]
    checksum = "md5:" + hashlib.md5(good).hexdigest()
    bad = bytearray(good)
    bad[40:60] = bytes(20)  # inside the first member's data
    for label, body in (("corrupt", bytes(bad)), ("truncated", good[: len(good) // 2])):
        server.add(f"/{label}.zip", body)
        dest = tmp_path / label
        with pytest.raises(ChecksumError):
            prepare(HAM_REMOTES[1:2], dest, "ham10000", backoff=0, mirror={
                "HAM10000_images_part_2.zip": {"url": server.url(f"/{label}.zip"), "checksum": checksum}})
        assert not (dest / "ham10000" / "raw" / "HAM10000_images_part_2.zip").exists()
        # the same bytes placed locally: extraction and loading refuse them
        folder = tmp_path / f"{label}-local"
        folder.mkdir()
        (folder / "HAM10000_metadata.tab").write_bytes(files["HAM10000_metadata.tab"])
        (folder / "HAM10000_images_part_1.zip").write_bytes(files["HAM10000_images_part_1.zip"])
        (folder / "HAM10000_images_part_2.zip").write_bytes(body)
        with pytest.raises(ArchiveError, match="corrupt or truncated"):
            safe_extract(folder / "HAM10000_images_part_2.zip", folder / "x")
        assert not is_complete(folder / "x") and not (folder / "x").exists()
        with pytest.raises(ArchiveError, match="corrupt or truncated"):
            load_dataset("ham10000", tmp_path / "d", path=str(folder), cache=False)

    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "HAM10000_metadata.tab").write_bytes(files["HAM10000_metadata.tab"])
    (folder / "HAM10000_images_part_1.zip").write_bytes(files["HAM10000_images_part_1.zip"])
    with pytest.raises(ValueError, match="were not found"):
        load_dataset("ham10000", tmp_path / "d", path=str(folder), cache=False)
    some = load_dataset("ham10000", tmp_path / "d", path=str(folder), cache=False, allow_missing=True)
    assert len(some.train_x) + len(some.test_x) == len(rows) // 2
    with pytest.raises(FileNotFoundError, match="no HAM10000 metadata"):
        load_dataset("ham10000", tmp_path / "empty")


def test_metadata_errors():
    ok = b"lesion_id,image_id,dx\nHAM_1,ISIC_1,mel\n"
    assert parse_metadata(ok, "m") == [{"lesion_id": "HAM_1", "image_id": "ISIC_1", "dx": "mel"}]
    with pytest.raises(ValueError, match="dx 'melanoma' is not one of"):
        parse_metadata(b"lesion_id,image_id,dx\nHAM_1,ISIC_1,melanoma\n", "m")
    with pytest.raises(ValueError, match="listed twice"):
        parse_metadata(ok + b"HAM_2,ISIC_1,nv\n", "m")
    with pytest.raises(ValueError, match=r"no column\(s\) \['lesion_id'\]"):
        parse_metadata(b"image_id,dx\nISIC_1,mel\n", "m")
    with pytest.raises(ValueError, match="test_fraction"):
        lesion_split(parse_metadata(ok, "m"), test_fraction=1.0)
