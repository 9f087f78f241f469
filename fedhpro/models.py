"""Models: a feature extractor plus a linear classifier, `forward(x) -> (features, logits)`.

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

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FeatureClassifier(nn.Module):
    """Backbone -> (optional projection to a shared feature size) -> linear classifier."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, num_classes: int, feature_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        if feature_dim is not None and feature_dim != backbone_dim:
            # Model heterogeneity: project every architecture to one shared d (HtFLlib-style).
            self.projection: nn.Module = nn.Sequential(nn.Linear(backbone_dim, feature_dim), nn.ReLU())
        else:
            self.projection = nn.Identity()
            feature_dim = backbone_dim
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.features(x)
        return feature, self.classifier(feature)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """The official FedHPro/CReFF CIFAR ResNet (no max-pool, 3x3 stem)."""

    def __init__(self, num_blocks: list[int], nf: int = 32, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        in_planes = nf
        stages = []
        for i, (blocks, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            planes = nf * 2**i
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Official code: avg_pool2d(out, out.shape[2]), i.e. a global average pool for square inputs.
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class SmallCNN(nn.Module):
    """A small conv net for tiny images (e.g. 8x8 digits); non-negative features like ResNet's."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FedProtoCNN(nn.Module):
    """FedProto's CNNMnist / CNNFemnist (yuetan031/FedProto lib/models/models.py) up to its 50-d prototype:
    conv 5x5 (10) -> max-pool -> ReLU -> conv 5x5 (20) -> Dropout2d -> max-pool -> ReLU -> fc 320->50 -> ReLU,
    for 28x28 inputs. Its classifier (fc 50 -> C) is FeatureClassifier's head; the dropout FedProto applies
    between the prototype and that head is left out (docs/assumptions.md)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(10, 20, 5), nn.Dropout2d(), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
            nn.Linear(320, 50), nn.ReLU(),
        )
        self.out_dim = 50

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _cnn_fedproto(in_channels: int) -> tuple[nn.Module, int]:
    net = FedProtoCNN(in_channels)
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
        net = ResNetBackbone(blocks, nf=nf, in_channels=in_channels)
        return net, net.out_dim

    return build


def _cnn(in_channels: int) -> tuple[nn.Module, int]:
    net = SmallCNN(in_channels)
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
    return FeatureClassifier(backbone, dim, num_classes, feature_dim)
