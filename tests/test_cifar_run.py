"""FedHPro on the real CIFAR-10 copy in the shared data (conftest.SHARED_DATA; JPEG image folders): trains above chance.

The official ResNet-10 takes minutes per round on a 2-core CPU, so CI uses the small CNN and the
official NID1 split (creff, alpha 0.5, rho 100: 12,406 training images); the ResNet-10 run is the
same command with `model: resnet10` (see README).
"""


import pytest

from conftest import SHARED_DATA
from fedhpro.config import from_dict
from fedhpro.train import train

SHARED_TAR = SHARED_DATA / "cifar10-jpeg.tar"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TAR.exists(), reason=f"{SHARED_TAR} not present")
def test_fedhpro_on_real_cifar10_rises_above_chance(tmp_path):
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    (root / "cifar10" / "cifar10-jpeg.tar").symlink_to(SHARED_TAR)
    cfg = from_dict({"method": "fedhpro", "dataset": "cifar10", "data_root": str(root), "partition": "creff",
                     "alpha": 0.5, "imbalance_ratio": 100, "num_clients": 10, "model": "cnn", "rounds": 2,
                     "local_epochs": 1, "batch_size": 64, "lr": 0.1, "seed": 0, "test_batch_size": 1000,
                     # scored after the last round only (a 10,000-image evaluation costs half a round on this
                     # CPU); the diagnostics columns are tested in test_diagnostics.py
                     "eval_every": 2, "diagnostics": False})
    df = train(cfg, tmp_path / "run")
    assert len(df) == 2 and (df["status"] == "finished").all()
    assert df["test_acc"].iloc[:1].isna().all()
    assert df["test_acc"].iloc[1] > 0.15  # chance: 0.10 on the balanced 10,000-image test set
    counts = df["bytes_up"].iloc[0]
    assert counts > 0
