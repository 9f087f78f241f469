"""The parity harness's own parts (fedhpro.parity): the CIFAR python archive both codes read, the parity
pack, the official-run wrapper and its output parsing, and the closing table. The official code itself is
not in this repository; a stand-in checkout with its file layout and output format drives the wrapper."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedhpro import parity
from fedhpro.data.cifar import load_cifar

from conftest import stand_in_checkout


def tiny_arrays(n_train=50, n_test=20, seed=0) -> parity.CifarArrays:
    rng = np.random.default_rng(seed)
    return parity.CifarArrays(rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
                              rng.integers(0, 10, n_train), rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
                              rng.integers(0, 10, n_test), tuple(f"c{i}" for i in range(10)))


def test_python_archive_reads_alike_in_torchvision_and_ours(tmp_path):
    arrays = tiny_arrays()
    folder = parity.write_cifar_python(arrays, tmp_path / "data" / "CIFAR10")
    assert sorted(p.name for p in folder.iterdir()) == ["batches.meta", "data_batch_1", "data_batch_2",
                                                        "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    ours = load_cifar(tmp_path, "cifar10", path=str(folder.parent), source="python", cache=False)
    assert np.array_equal(ours.train_x.numpy(), arrays.train_x) and np.array_equal(ours.train_y.numpy(),
                                                                                   arrays.train_y)
    assert np.array_equal(ours.test_x.numpy(), arrays.test_x) and ours.class_names == arrays.names
    # torchvision (as the official code uses it), verifying the files against their own md5
    import hashlib

    from torchvision.datasets import CIFAR10

    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in folder.iterdir()}
    saved = CIFAR10.train_list, CIFAR10.test_list, CIFAR10.meta
    try:
        CIFAR10.train_list = [[n, md5[n]] for n, _ in CIFAR10.train_list]
        CIFAR10.test_list = [[n, md5[n]] for n, _ in CIFAR10.test_list]
        CIFAR10.meta = {**CIFAR10.meta, "md5": md5["batches.meta"]}
        tv = CIFAR10(str(folder.parent), train=True, download=False)
        tv_test = CIFAR10(str(folder.parent), train=False, download=False)
    finally:
        CIFAR10.train_list, CIFAR10.test_list, CIFAR10.meta = saved
    assert np.array_equal(tv.data.transpose(0, 3, 1, 2), arrays.train_x) and tv.targets == arrays.train_y.tolist()
    assert np.array_equal(tv_test.data.transpose(0, 3, 1, 2), arrays.test_x) and tv.classes == list(arrays.names)
    with pytest.raises(RuntimeError):  # upstream's md5 (unchanged class attributes) refuses these files
        CIFAR10(str(folder.parent), train=True, download=False)


def image_folder_tar(path: Path, per_class_train=30, per_class_test=3) -> Path:
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w") as tf:
        for split, n in (("train", per_class_train), ("test", per_class_test)):
            for c in [f"class{i}" for i in range(10)]:
                for j in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
                    info = tarfile.TarInfo(f"cifar/{split}/{c}/{j:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tf.addfile(info, buf)
    return path


def test_pack_keeps_the_used_images_and_reads_back(tmp_path):
    source = image_folder_tar(tmp_path / "c10.tar")
    full = parity.read_cifar(source)
    pack = parity.pack_cifar(source, [25], tmp_path / "p.parity.tar")
    back = parity.read_cifar(pack)
    used = parity.used_training_indices(full.train_y, [25])
    assert 0 < len(used) < len(full.train_y)  # rho 100 drops most of the tail classes
    assert np.array_equal(back.train_x[used], full.train_x[used]) and np.array_equal(back.train_y, full.train_y)
    unused = np.setdiff1d(np.arange(len(full.train_y)), used)
    assert not back.train_x[unused].any()  # never read by either code beyond their labels
    assert np.array_equal(back.test_x, full.test_x)
    # the partition of the packed data equals the full data's (labels decide it)
    from fedhpro.partition import partition_labels

    a = partition_labels(full.train_y, scheme="creff", seed=25, **parity.PROTOCOL)
    b = partition_labels(back.train_y, scheme="creff", seed=25, **parity.PROTOCOL)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_official_wrapper_runs_the_checkout_and_parses_its_output(tmp_path):
    parity.write_cifar_python(tiny_arrays(), tmp_path / "work" / "data" / "CIFAR10")
    counts = [[3, 1, 0, 0, 0, 0, 0, 0, 0, 0], [0, 2, 5, 0, 0, 0, 0, 0, 0, 1]]
    checkout = stand_in_checkout(tmp_path, counts)
    parity.check_official(checkout)
    trace = parity.run_official(checkout, tmp_path / "work", 25, 3, 1, "cpu", log=lambda m: None)
    assert trace.accuracy == pytest.approx([10.0, 15.0, 20.0])
    assert trace.client_counts == counts
    assert len(trace.seconds) == 3 and all(s > 0 for s in trace.seconds)
    said: list[str] = []
    parity.run_official(checkout, tmp_path / "work", 25, 3, 1, "cpu", log=said.append, expected_counts=counts)
    assert "  partition identical (client x class counts, seed 25)" in said
    other = [counts[0], [0, 2, 4, 0, 0, 0, 0, 0, 0, 2]]
    with pytest.raises(parity.ParityError, match="seed 25: the official partition differs from ours"):
        parity.run_official(checkout, tmp_path / "work", 25, 3, 1, "cpu", log=lambda m: None, expected_counts=other)
    failing = stand_in_checkout(tmp_path / "f", counts, fail=True)
    with pytest.raises(parity.ParityError, match="exited 1 after 3 of 3 rounds"):
        parity.run_official(failing, tmp_path / "work", 25, 3, 1, "cpu", log=lambda m: None)
    with pytest.raises(parity.ParityError, match="not a checkout of the official FedHPro code"):
        parity.check_official(tmp_path)


def test_table_and_spread():
    t = parity.RunTrace
    traces = {"official": [t([10.0, 20.0], [2.0, 1.0]), t([14.0, 24.0], [2.0, 1.2])],
              "last_client": [t([12.0, 40.0], [1.0, 0.5]), t([12.0, 40.0], [1.0, 0.5])],
              "fedavg": [t([30.0, 30.0], [1.0, 0.5])]}
    table = parity.format_table(traces, 2)
    assert "| 1 | 12.00 ± 2.83 | 12.00 ± 0.00 | 30.00 |" in table
    assert table.splitlines()[-1].endswith("| 1.10 | 0.50 | 0.50 |")  # rounds 2+ only
    assert parity.within_spread(traces["official"], traces["last_client"], 2) == [True, False]


def test_cli_refuses_bad_arguments(tmp_path):
    from fedhpro.config import ConfigError

    with pytest.raises(ConfigError, match="--rounds must be >= 1"):
        parity.main([str(tmp_path), "--rounds", "0"])
    with pytest.raises(ConfigError, match="does not exist"):
        parity.main([str(tmp_path), "--cifar", str(tmp_path / "none.tar")])
