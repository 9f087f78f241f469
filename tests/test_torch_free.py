"""Validating a workflow config imports no torch (`fedhpro.lazy`): every shipped workflow config gets its run table
built, and every method, dataset and model declaration read, in a fresh Python whose sys.modules must then hold
no torch, torchvision, PIL or scikit-learn. A subprocess: this test process has torch loaded already."""

import json
import subprocess
import sys
import textwrap
import types

import torch

from conftest import REPO
from fedhpro.lazy import lazy_module, no_grad

HEAVY = ("torch", "torchvision", "PIL", "sklearn")

# Run in a fresh interpreter at the repository root; EXTRA_IMPORTS are imported first (the failing-probe test).
PROBE = textwrap.dedent('''
    import dataclasses, glob, inspect, json, sys, traceback
    import yaml

    HEAVY = {heavy!r}
    first = {{}}  # heavy module -> the stack that first imported it (named on failure)

    class Recorder:
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in HEAVY and top not in first:
                first[top] = "".join(traceback.format_stack(limit=12)[:-1])
            return None

    sys.meta_path.insert(0, Recorder())
    for name in {extra!r}:
        __import__(name)

    from snakemake.utils import validate
    from fedhpro.config import from_dict
    from fedhpro.errors import ConfigError
    from fedhpro.runtable import load_run_table

    runs = {{}}
    for path in sorted(glob.glob("config/*.yaml")):
        cfg = yaml.safe_load(open(path))
        if "experiments" not in cfg:  # config/published.yaml: a results registry, not a workflow config
            continue
        validate(cfg, schema="workflow/schemas/config.schema.yaml")
        runs[path] = len(load_run_table(cfg, cfg["data_root"]).runs)  # what workflow/rules/common.smk calls

    from fedhpro.batched import check_batchable
    from fedhpro.data import DATASETS
    from fedhpro.methods import METHODS, describe_methods, method_revision
    from fedhpro.models import MODELS
    from fedhpro.text import TEXT_BACKBONES

    methods = {{}}
    for name in METHODS:
        m = METHODS[name]
        fields = [f.name for f in dataclasses.fields(m.Params)]
        try:
            check_batchable(from_dict({{"dataset": "digits", "method": name}}), m.Client, ["cnn"])
            batchable = True
        except ConfigError:
            batchable = False
        methods[name] = [fields, list(m.modes), list(m.engines), method_revision(name), m.Client.__name__,
                         m.Server.__name__, batchable]
    describe_methods()
    datasets = {{}}
    for name, spec in DATASETS.items():
        if spec.check_options is not None:
            spec.check_options({{}})
        datasets[name] = [spec.num_classes, str(inspect.signature(spec.loader)),
                          [r.filename for r in spec.needed_downloads({{}})]]
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    print(json.dumps({{"runs": runs, "methods": methods, "datasets": datasets, "models": sorted(MODELS),
                      "text": sorted(TEXT_BACKBONES), "heavy": heavy, "first": first}}))
''')


def probe(extra: tuple[str, ...] = ()) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY, extra=extra)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_validating_every_workflow_config_imports_no_torch():
    out = probe()
    first = "\n".join(f"{name} first imported by:\n{stack}" for name, stack in out["first"].items())
    assert out["heavy"] == [], first
    # the probe really read everything: every shipped workflow config, method, dataset and model
    assert set(out["runs"]) == {"config/config.yaml", "config/paper.yaml", "config/published-mnist.yaml"}
    assert min(out["runs"].values()) > 0
    from fedhpro.data import DATASETS
    from fedhpro.methods import METHODS
    from fedhpro.models import MODELS
    assert set(out["methods"]) == set(METHODS) and set(out["datasets"]) == set(DATASETS)
    assert out["models"] == sorted(MODELS) and {"text_embedding_bag", "text_transformer"} <= set(out["text"])
    assert out["methods"]["fedavg"][-1] is True and out["methods"]["gfpl"][-1] is False  # check_batchable ran
    assert out["methods"]["fedprox"][0] == [f.name for f in __import__("dataclasses").fields(METHODS["fedprox"].Params)]


def test_the_probe_names_a_module_that_imports_torch():
    # fedhpro.train imports torch at module level (it trains): the probe must notice and say who imported it
    out = probe(extra=("fedhpro.train",))
    assert "torch" in out["heavy"]
    assert "fedhpro/train.py" in out["first"]["torch"]


def test_lazy_module_imports_on_first_attribute_access(tmp_path, monkeypatch):
    name = "fedhpro_lazy_probe_module"
    (tmp_path / f"{name}.py").write_text("VALUE = object()\n\ndef func():\n    return VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    proxy = lazy_module(name)
    assert name not in sys.modules  # nothing imported yet, and the stand-in is not registered
    value = proxy.VALUE
    real = sys.modules[name]
    assert real is not proxy and value is real.VALUE and proxy.func is real.func and proxy.func() is real.VALUE
    # copied into a plain module (no class-level __getattr__): later reads cost what they cost on the real module
    assert vars(proxy)["func"] is real.func and type(proxy) is types.ModuleType
    real.LATER = object()  # set after the copy: falls through to the real module
    assert proxy.LATER is real.LATER
    monkeypatch.delitem(sys.modules, name)


def test_lazy_torch_is_torch_and_no_grad_applies_at_call_time():
    lazy = lazy_module("torch")
    assert lazy.zeros is torch.zeros and lazy.nn.Module is torch.nn.Module
    assert lazy_module("torch.nn.functional").relu is torch.nn.functional.relu

    @no_grad
    def grad_enabled(x):
        """doc"""
        return torch.is_grad_enabled(), (x * 2).requires_grad

    assert grad_enabled(torch.ones(1, requires_grad=True)) == (False, False)
    assert torch.is_grad_enabled() and grad_enabled.__name__ == "grad_enabled" and grad_enabled.__doc__ == "doc"
