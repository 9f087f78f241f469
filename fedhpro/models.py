"""Models: a feature extractor plus a linear classifier, `forward(x) -> (features, logits)`.

The registry (`BACKBONES`/`MODELS`, `build_model`); the nn.Module classes are in `fedhpro.nets`, imported
when a model is built, so that naming and checking models needs no torch (`fedhpro.lazy`).

Every model exposes `.features(x)` (the d-dim representation the prototype
methods work on), `.classifier` (an `nn.Linear(d, C)`) and `.feature_dim`.

`resnet10` is the official FedHPro backbone (`backbone/ResNet10.py`, nf=32,
256-d features): stem conv3x3 without bias + BN + ReLU (no max-pool), four
BasicBlock stages 32/64/128/256 with strides 1/2/2/2, global average pooling.
Deliberate difference: the official model also defines an `encoder` MLP that is
never used in the forward pass, and a `_features` Sequential that duplicates
the stem/layer keys in the state_dict; we leave both out, so our state_dict
holds only parameters that train (this changes communicated bytes, not numbers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from fedhpro.lazy import lazy_module

if TYPE_CHECKING:
    from fedhpro.nets import FeatureClassifier

nn = lazy_module("torch.nn")
nets = lazy_module("fedhpro.nets")  # the architectures (torch): imported when a model is built


def _cnn_fedproto(in_channels: int) -> tuple[nn.Module, int]:
    net = nets.FedProtoCNN(in_channels)
    return net, net.out_dim


def _torchvision_backbone(name: str) -> Callable[[int], tuple[nn.Module, int]]:
    def build(in_channels: int) -> tuple[nn.Module, int]:
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if name.startswith("resnet"):
            dim = net.fc.in_features
            net.fc = nn.Identity()
            if in_channels != 3:
                net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        elif name.startswith("shufflenet"):
            dim = net.fc.in_features
            net.fc = nn.Identity()
            if in_channels != 3:
                net.conv1[0] = nn.Conv2d(in_channels, net.conv1[0].out_channels, 3, 2, 1, bias=False)
        else:  # mobilenet_v2
            dim = net.classifier[-1].in_features
            net.classifier = nn.Identity()
            if in_channels != 3:
                net.features[0][0] = nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False)
        return net, dim

    return build


def _resnet(blocks: list[int], nf: int) -> Callable[[int], tuple[nn.Module, int]]:
    def build(in_channels: int) -> tuple[nn.Module, int]:
        net = nets.ResNetBackbone(blocks, nf=nf, in_channels=in_channels)
        return net, net.out_dim

    return build


def _cnn(in_channels: int) -> tuple[nn.Module, int]:
    net = nets.SmallCNN(in_channels)
    return net, net.out_dim


BACKBONES: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "cnn": _cnn,
    "cnn_fedproto": _cnn_fedproto,  # FedProto's MNIST/FEMNIST net (28x28 inputs)
    "resnet10": _resnet([1, 1, 1, 1], nf=32),  # official FedHPro: 256-d features
    "resnet18_cifar": _resnet([2, 2, 2, 2], nf=64),
    "resnet18": _torchvision_backbone("resnet18"),
    "resnet34": _torchvision_backbone("resnet34"),
    "mobilenet_v2": _torchvision_backbone("mobilenet_v2"),
    "shufflenet_v2": _torchvision_backbone("shufflenet_v2_x1_0"),
}
BACKBONES.update(__import__("fedhpro.text", fromlist=["TEXT_BACKBONES"]).TEXT_BACKBONES)  # text_embedding_bag, ...
MODELS = BACKBONES


def build_model(name: str, *, num_classes: int, in_channels: int, feature_dim: int | None = None,
                **model_kwargs) -> FeatureClassifier:
    """`model_kwargs` come from the dataset (e.g. vocab_size for text models) and go to backbones that take them."""
    if name not in BACKBONES:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(BACKBONES))}")
    backbone, dim = BACKBONES[name](in_channels, **model_kwargs) if model_kwargs else BACKBONES[name](in_channels)
    return nets.FeatureClassifier(backbone, dim, num_classes, feature_dim)
