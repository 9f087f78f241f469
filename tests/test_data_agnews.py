"""AG News: tokenizer/vocabulary, upstream CSVs served over loopback HTTP, the fast.ai archive, the real
offline test CSV (and its documented train/test split), text backbones, and short federated runs."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from fedhpro.data import DATASETS, load_dataset
from fedhpro.data.agnews import (AGNEWS_CLASSES, AGNEWS_TEST_REMOTE, AGNEWS_TRAIN_REMOTE, PAD_ID, UNK_ID, build_vocab,
                                 encode, load_agnews_arrays, parse_csv, tokenize, vocab_of)
from fedhpro.download import ArchiveError, ChecksumError, is_complete, prepare, safe_extract
from fedhpro.models import BACKBONES, build_model


REAL_TEST = SHARED_DATA / "ag_news_test.csv"
REAL_MD5 = "d52ea96a97a2d943681189a97654912d"
needs_real = pytest.mark.skipif(not REAL_TEST.is_file(), reason=f"{REAL_TEST} not available")


def upstream_csv(rows: list[tuple[int, str, str]]) -> bytes:
    """Rows in the upstream format: every field quoted, "" escapes, \\n line ends."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for row in rows:
        writer.writerow([str(row[0]), row[1], row[2]])
    return out.getvalue().encode("utf-8")


TRAIN_ROWS = [
    (3, "Stocks rally, oil falls", "Wall St. rallied on Monday (Reuters) as oil prices fell."),
    (2, "Team wins the \"big\" game", "The home team won 3-1! Fans cheered."),
    (1, "Talks resume", "Leaders met in Geneva; talks resume today."),
    (4, "New chip unveiled", "A faster chip: more cores, less power."),
    (2, "Coach quits", "The coach quit after the game."),
]
TEST_ROWS = [
    (4, "Quantum chip", "A quantum chip beats oil rigs?"),
    (1, "Leaders meet", "Leaders meet in Zanzibar."),
]


# ----------------------------------------------------------------------------- tokenizer and vocabulary


def test_tokenizer_matches_basic_english_rules():
    assert tokenize("Hello, World! It's 3.5 (AP)") == ["hello", ",", "world", "!", "it", "'", "s", "3", ".", "5",
                                                       "(", "ap", ")"]
    assert tokenize('Say "hi"; now: go?<br />Done') == ["say", "hi", "now", "go", "?", "done"]
    assert tokenize("  \t\n ") == []
    assert tokenize("A\\B  #36;10") == ["a\\b", "#36", "10"]  # backslashes and '&#36;' remnants left as they are


def test_vocab_from_train_only_and_unknown_words():
    train = [tokenize(t) for t in ("b a a", "c a b", "d")]
    vocab = build_vocab(train)
    assert vocab == ["<pad>", "<unk>", "a", "b", "c", "d"]  # by count, ties alphabetical
    assert build_vocab(train, min_freq=2) == ["<pad>", "<unk>", "a", "b"]
    assert build_vocab(train, max_size=3) == ["<pad>", "<unk>", "a"]
    with pytest.raises(ValueError, match="max_size"):
        build_vocab(train, max_size=1)
    ids = encode([tokenize("a zebra b a a a"), [], tokenize("c")], vocab, max_len=4)
    assert ids.dtype == np.int64 and ids.shape == (3, 4)
    assert ids.tolist() == [[2, UNK_ID, 3, 2], [PAD_ID] * 4, [4, 0, 0, 0]]  # truncated, unknown -> 1, padded with 0


def test_parse_csv_errors():
    texts, y = parse_csv(upstream_csv(TRAIN_ROWS), "x")
    assert y.tolist() == [2, 1, 0, 3, 1] and texts[1] == 'Team wins the "big" game The home team won 3-1! Fans cheered.'
    with pytest.raises(ValueError, match=r"line 2: class '5' is not 1..4"):
        parse_csv(b'"1","a","b"\n"5","c","d"\n', "bad.csv")
    with pytest.raises(ValueError, match="line 1: 2 fields"):
        parse_csv(b'"1","a"\n', "bad.csv")
    with pytest.raises(ValueError, match="not UTF-8"):
        parse_csv(b'"1","\xff","b"\n', "bad.csv")
    with pytest.raises(ValueError, match="no rows"):
        parse_csv(b"", "empty.csv")


# ----------------------------------------------------------------------------- download and load


def test_spec_and_remotes():
    spec, off = DATASETS["agnews"], DATASETS["agnews_testsplit"]
    assert (spec.num_classes, spec.default_model, spec.default_augment, spec.train_size) == (
        4, "text_embedding_bag", "none", 120000)
    assert spec.downloads == (AGNEWS_TRAIN_REMOTE, AGNEWS_TEST_REMOTE)
    assert AGNEWS_TEST_REMOTE.md5 == REAL_MD5 and AGNEWS_TRAIN_REMOTE.md5 == "b1a00f826fdfbd249f79597b59e1dc12"
    assert AGNEWS_TRAIN_REMOTE.url.startswith("https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/")
    assert off.downloads == (AGNEWS_TEST_REMOTE,) and off.train_size == 6080 and "not the paper" in off.description
    assert {"text_embedding_bag", "text_transformer"} <= set(BACKBONES)


def test_upstream_csvs_over_http(server, tmp_path):
    train_b, test_b = upstream_csv(TRAIN_ROWS), upstream_csv(TEST_ROWS)
    server.add("/ag/train.csv", train_b)
    server.add("/ag/test.csv", test_b)
    root = tmp_path / "data"
    # the upstream checksums are enforced: these tiny files are refused without configured ones
    with pytest.raises(ChecksumError, match=AGNEWS_TRAIN_REMOTE.md5):
        prepare(DATASETS["agnews"].downloads, root, "agnews", mirror={"*": server.url("/ag/")}, backoff=0)
    assert not (root / "agnews" / "raw" / "train.csv").exists()
    mirror = {f: {"url": server.url(f"/ag/{f}"), "checksum": "md5:" + hashlib.md5(b).hexdigest()}
              for f, b in (("train.csv", train_b), ("test.csv", test_b))}
    raw = prepare(DATASETS["agnews"].downloads, root, "agnews", mirror=mirror, backoff=0)
    assert (raw / "train.csv").read_bytes() == train_b and (raw / "test.csv").read_bytes() == test_b

    data = load_dataset("agnews", root, max_len=12)
    assert data.mean is None and data.std is None and data.class_names == AGNEWS_CLASSES and data.num_classes == 4
    assert data.train_x.dtype == torch.int64 and data.train_x.shape == (5, 12) and data.test_x.shape == (2, 12)
    assert data.train_y.tolist() == [2, 1, 0, 3, 1] and data.test_y.tolist() == [3, 0]
    vocab = vocab_of(load_agnews_arrays(root, max_len=12))
    assert data.model_kwargs == {"vocab_size": len(vocab)} and vocab[:2] == ["<pad>", "<unk>"]
    train_words = {w for _, t, d in TRAIN_ROWS for w in tokenize(t + " " + d)}
    assert set(vocab[2:]) == train_words  # the vocabulary comes from train.csv only
    index = {w: i for i, w in enumerate(vocab)}
    first_test = tokenize(TEST_ROWS[0][1] + " " + TEST_ROWS[0][2])  # quantum chip a quantum chip beats oil rigs ?
    expected = [index.get(w, UNK_ID) for w in first_test]
    assert len(expected) == 9 and data.test_x[0].tolist() == expected + [PAD_ID] * 3
    assert expected.count(UNK_ID) == 5 and index["oil"] in expected  # quantum x2, beats, rigs, ? are unknown
    assert "quantum" not in index and "zanzibar" not in index
    # shorter texts are right-padded with <pad>=0
    n = len(tokenize(TRAIN_ROWS[4][1] + " " + TRAIN_ROWS[4][2]))
    assert n < 12 and (data.train_x[4, n:] == PAD_ID).all() and (data.train_x[4, :n] != PAD_ID).all()
    # cached: a second load reads the npz
    assert len(list((root / "agnews" / "cache").glob("*.npz"))) == 1
    again = load_dataset("agnews", root, max_len=12)
    assert torch.equal(again.train_x, data.train_x) and len(list((root / "agnews" / "cache").glob("*.npz"))) == 1

    # a corrupted or truncated transfer never appears under the final name
    for plan, body in (("corrupt", test_b[:-3] + b"XYZ"), ("truncated", test_b[: len(test_b) // 2])):
        server.add(f"/bad/{plan}.csv", body)
        dest = tmp_path / plan
        with pytest.raises(ChecksumError):
            prepare([AGNEWS_TEST_REMOTE], dest, "agnews", backoff=0, mirror={"test.csv": {
                "url": server.url(f"/bad/{plan}.csv"), "checksum": mirror["test.csv"]["checksum"]}})
        assert not (dest / "agnews" / "raw" / "test.csv").exists()
    # without train.csv the paper protocol cannot be loaded; the error names the offline option
    (raw / "train.csv").unlink()
    with pytest.raises(FileNotFoundError, match="split_test_for_train"):
        load_dataset("agnews", root, cache=False)


def test_fastai_archive_and_truncation(tmp_path):
    files = {"ag_news_csv/train.csv": upstream_csv(TRAIN_ROWS), "ag_news_csv/test.csv": upstream_csv(TEST_ROWS),
             "ag_news_csv/classes.txt": "\n".join(AGNEWS_CLASSES).encode() + b"\n",
             "ag_news_csv/readme.txt": b"AG's News Topic Classification Dataset\n"}
    archive = tmp_path / "ag_news_csv.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    root = tmp_path / "data"
    data = load_dataset("agnews", root, path=str(archive), max_len=12, cache=False)
    assert data.train_y.tolist() == [2, 1, 0, 3, 1] and data.test_x.shape == (2, 12)
    safe_extract(archive, root / "agnews" / "extracted")
    same = load_dataset("agnews", root, path=str(root / "agnews" / "extracted"), max_len=12, cache=False)
    assert torch.equal(same.train_x, data.train_x) and torch.equal(same.test_x, data.test_x)
    truncated = tmp_path / "cut.tgz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        safe_extract(truncated, tmp_path / "cut")
    assert not is_complete(tmp_path / "cut") and not (tmp_path / "cut").exists()
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        load_dataset("agnews", root, path=str(truncated), cache=False)


# ----------------------------------------------------------------------------- the real test CSV


@needs_real
def test_real_test_csv_and_offline_split(tmp_path):
    texts, y = parse_csv(REAL_TEST.read_bytes(), str(REAL_TEST))
    assert len(texts) == 7600 and np.bincount(y).tolist() == [1900] * 4
    # the download step with the offline copy: identical bytes, so the upstream md5 itself verifies
    raw = prepare(DATASETS["agnews_testsplit"].downloads, tmp_path, "agnews_testsplit",
                  mirror={"test.csv": str(REAL_TEST)})
    assert hashlib.md5((raw / "test.csv").read_bytes()).hexdigest() == REAL_MD5
    data = load_dataset("agnews_testsplit", tmp_path)
    assert data.train_x.shape == (6080, 200) and data.test_x.shape == (1520, 200)
    assert data.train_x.dtype == torch.int64 and data.mean is None
    assert torch.bincount(data.train_y).tolist() == [1520] * 4 and torch.bincount(data.test_y).tolist() == [380] * 4
    arrays = load_agnews_arrays(tmp_path, split_test_for_train=True, name="agnews_testsplit")
    vocab = vocab_of(arrays)
    assert data.model_kwargs["vocab_size"] == len(vocab) > 15000
    # built from the train part only: every train id is known, and test-only words became <unk>
    train_ids = set(np.unique(arrays["train_x"]).tolist())
    assert train_ids == set(range(len(vocab))) - {UNK_ID}
    assert (arrays["test_x"] == UNK_ID).sum() > 500
    # the same split through the agnews loader's option (path= the CSV itself), and it is fixed
    other = load_dataset("agnews", tmp_path / "x", path=str(REAL_TEST), split_test_for_train=True)
    assert torch.equal(other.train_x, data.train_x) and torch.equal(other.test_y, data.test_y)
    with pytest.raises(ValueError, match="single CSV"):
        load_dataset("agnews", tmp_path / "x", path=str(REAL_TEST))


# ----------------------------------------------------------------------------- models and federated runs


def test_text_backbones():
    x = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    for name in ("text_embedding_bag", "text_transformer"):
        torch.manual_seed(0)
        model = build_model(name, num_classes=4, in_channels=0, vocab_size=10)
        model.eval()
        feats, logits = model(x)
        assert feats.shape == (3, 256) and logits.shape == (3, 4) and torch.isfinite(feats).all()
        assert (feats >= 0).all() and model.feature_dim == 256
        # trailing padding changes nothing
        wider = torch.cat([x, torch.zeros(3, 5, dtype=torch.long)], 1)
        assert torch.allclose(model(wider)[0], feats, atol=1e-6)
        with pytest.raises(ValueError, match="token ids"):
            model(torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError, match="vocab_size"):
        build_model("text_embedding_bag", num_classes=4, in_channels=0)


@needs_real
@pytest.mark.parametrize("method", ["fedavg", "fedhpro"])
def test_federated_runs_on_offline_split(tmp_path, monkeypatch, method):
    from fedhpro.config import from_dict
    from fedhpro.methods import creff
    from fedhpro.train import train

    def no_dsa(*a, **k):
        raise AssertionError("DSA must be skipped for token ids")

    monkeypatch.setattr(creff, "siamese_augment", no_dsa)  # FedHPro's client gradients use it for images only
    prepare(DATASETS["agnews_testsplit"].downloads, tmp_path / "data", "agnews_testsplit",
            mirror={"test.csv": str(REAL_TEST)})
    cfg = from_dict({"dataset": "agnews_testsplit", "data_root": str(tmp_path / "data"), "method": method,
                     "num_clients": 10, "partition": "dirichlet", "alpha": 0.5, "batch_size": 32, "lr": 0.1,
                     "local_epochs": 3, "rounds": 2, "seed": 3, "device": "cpu"})
    df = train(cfg, tmp_path / "run")
    assert list(df["round"]) == [1, 2] and (df["status"] == "finished").all()
    # chance is 0.25; FedHPro's global model is one client's (last-client aggregation, as the official code)
    assert df["test_acc"].iloc[-1] > (0.3 if method == "fedhpro" else 0.35), df["test_acc"].tolist()
