"""Shared pytest setup: the local SLURM cluster fixtures (started on demand for tests marked `slurm`), the
shared-data location, the base config of the method tests and the helpers every run-comparing test uses."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from httpserver import LoopbackHTTPServer  # noqa: E402
from slurm_cluster import slurm_autostart, slurm_cluster  # noqa: E402,F401

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fedhpro.layout import shared_data  # noqa: E402

# One thread per test process: on the 2-core CI machine this is faster than two competing threads,
# and CPU results are bit-reproducible for a fixed thread count.
torch.set_num_threads(1)
pytest_plugins = ["faults_report"]  # fault_ledger fixture + the fault-injection summary line

REPO = Path(__file__).resolve().parents[1]
# Real datasets that are never committed (CIFAR-10 JPEG tar, MNIST, USPS, Office-Caltech-10, AG News test):
# `FEDHPRO_SHARED_DATA`, else `../shared/data` beside the repository. Tests that need a file skip without it.
SHARED_DATA = shared_data()



def digits_run(**keys) -> dict:
    """The base of the tests' small runs: scikit-learn's digits (offline, 1797 8x8 images; seconds a run on a CPU)
    split Dirichlet(0.5) over the clients, batch 32, lr 0.05, with `keys` added or replaced. Each test file states
    what its runs differ in (clients, rounds, seed, ...) as `BASE = digits_run(...)`."""
    return {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "batch_size": 32, "lr": 0.05, **keys}


# The per-method tests' run: scikit-learn digits over 6 clients, 3 rounds of 3 local epochs (seconds on a CPU).
METHOD_BASE = digits_run(num_clients=6, rounds=3, local_epochs=3, lr=0.1, seed=0)
# Evaluation modes a prototype method is tested in; `heterogeneous`: different backbones per client.
MODES = {"personalized": {"eval_mode": "personalized"}, "global": {"eval_mode": "global"},
         "heterogeneous": {"eval_mode": "personalized", "client_models": ["cnn", "resnet10"]}}
TIME_COLUMNS = ["time_local", "time_server", "time_eval", "time_io"]


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 (tests/httpserver.py) for the download tests; a "stall" lasts 2 s."""
    with LoopbackHTTPServer(stall_s=2.0) as srv:
        yield srv


def numbers(df: pd.DataFrame) -> pd.DataFrame:
    """A run's metrics without the wall-clock columns: what must be bit-identical between equal runs."""
    return df[[c for c in df.columns if c not in TIME_COLUMNS]].reset_index(drop=True)


def one_line_error(capsys, rc, expect_rc=2) -> str:
    """The captured stderr of a CLI call that must fail with exit `expect_rc` and one `error: ...` line."""
    err = capsys.readouterr().err.strip()
    assert rc == expect_rc, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook (see the end)
def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist's `--dist loadgroup` (scripts/run-tests.sh): each group runs on one worker.

    - every test marked `slurm`: one group, run one after the other; they share the one local cluster,
      expect its queue idle, and one of them takes the cluster down and up again;
    - the tests of a module that use one of the module's own module-scoped fixtures (a trained run, a
      finished workflow, test_faults' background kill campaign): one group per module, so that setup is
      made once, not once per worker.
    """
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group("slurm"))
            continue
        module = item.nodeid.split("::")[0]
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d.scope == "module" and d.baseid == module for fixturedefs in defs.values() for d in fixturedefs):
            item.add_marker(pytest.mark.xdist_group(module))
    if config.getoption("loadgroup", False):  # set on xdist's workers under --dist loadgroup
        for item in items:
            _group_suffix(item)


def _group_suffix(item) -> None:
    """What pytest-xdist 3.8 does on a worker for a test with `xdist_group` marks: its node id gets the suffix
    `@<group>`, which the controller's scheduler reads. xdist writes `item._nodeid`, which pytest 9 no longer
    reads (the id is `item._id`, a NodeId), so without this every group is silently ignored."""
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    if not names or "@" in item.nodeid:
        return
    nodeid = f"{item.nodeid}@{'_'.join(names)}"
    if hasattr(item, "_id"):
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(nodeid)
    else:
        item._nodeid = nodeid


# ---- the official FedHPro code's stand-in (tests/test_parity.py, tests/test_bench_paper.py) ----
STAND_IN = '''
import sys, time
from options import args_parser
from torchvision import datasets
args = args_parser()
data = datasets.CIFAR10("./data/CIFAR10/", train=True, download=True)
print("img_num_class")
print([5, 1])
for client, counts in enumerate(COUNTS):
    print(f"{client}: {counts}")
accs = []
for r in range(args.num_rounds):
    time.sleep(0.05)
    accs.append(round(0.1 + 0.05 * r, 4))
    print("\\rFedHPro-training:  50%|#####     | 1/2 [00:01<00:01]" if r else "", end="")  # tqdm: no newline
    print("\\t ACC:", accs)
print("\\n ALL_ACC:", accs)
FAIL
'''


def stand_in_checkout(tmp_path: Path, counts, fail: bool = False, hang: bool = False) -> Path:
    """A stand-in for a checkout of the official FedHPro code (never in this repository): its file layout, and a
    main_run.py that reads CIFAR10 as it does and prints `counts` (client x class) and per-round accuracies in its
    format (`fedhpro.parity` and the benchmark's `paper` section need the real checkout only for real numbers);
    `fail`: it exits with an error after its rounds; `hang`: it sleeps for ten minutes after printing the counts."""
    root = tmp_path / "official"
    (root / "utils").mkdir(parents=True)
    (root / "backbone").mkdir()
    (root / "utils" / "sample_dirichlet.py").write_text("")
    (root / "backbone" / "ResNet10.py").write_text("")
    (root / "options.py").write_text(
        "import argparse\n"
        "def args_parser():\n"
        "    p = argparse.ArgumentParser()\n"
        "    p.add_argument('--num_rounds', type=int)\n"
        "    p.add_argument('--seed', type=int)\n"
        "    return p.parse_known_args()[0]\n")
    (root / "main_run.py").write_text(STAND_IN.replace("COUNTS", repr(counts)).replace(
        "FAIL", "raise SystemExit('boom')" if fail else "").replace("accs = []", "accs = []\n" + (
            "print('FedHPro-training: start', flush=True)\ntime.sleep(600)" if hang else "")))
    return root
