"""The architectures: every nn.Module class the project defines, in a module that imports torch (the registries do not).

The registries that name them stay free of torch (`fedhpro.models.BACKBONES`, `fedhpro.text.TEXT_BACKBONES`,
the method files), so that validating a workflow config never imports torch (`fedhpro.lazy`); they reach
these classes through ``nets = lazy_module("fedhpro.nets")`` when a model is actually built.

* Image models (`fedhpro.models`): `FeatureClassifier` (backbone -> optional projection -> linear
  classifier, `forward(x) -> (features, logits)`) and the backbones `ResNetBackbone` (with `BasicBlock`),
  `SmallCNN`, `FedProtoCNN`; see `fedhpro.models` for the official-code notes.
* Text encoders (`fedhpro.text`, whose docstring describes them): `EmbeddingBagEncoder`,
  `TransformerTextEncoder` and their helpers `_trim`, `_masked_mean`.
* Method-specific modules: FedTGP's prototype generator `TrainablePrototypes` (`fedhpro.methods.fedtgp`)
  and GFPL's `DualClassifierNet` (`fedhpro.methods.gfpl`).
* `MaskedBatchNorm`: not an architecture but the batched engine's BatchNorm over a padded batch's valid
  rows (`fedhpro.batched`), a `TorchFunctionMode` subclass and so, like the classes above, torch-bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

PAD_ID = 0  # the token id of padding in text inputs (fedhpro.data.agnews pads with 0)


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


# Text encoders (fedhpro.text): token ids N x L int64, 0 = padding.


def _trim(x: torch.Tensor, pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(x without trailing all-padding columns, mask of real tokens)."""
    if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"text models take N x L integer token ids, got {x.dtype} {tuple(x.shape)}")
    mask = x != pad_id
    if x.shape[1]:
        used = mask.any(0)
        length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
        x, mask = x[:, :length], mask[:, :length]
    return x, mask


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class EmbeddingBagEncoder(nn.Module):
    """scale x mean of the non-padding token embeddings -> Linear -> ReLU (see the module docstring)."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, out_dim: int = 256, scale: float = 32.0,
                 init_std: float = 0.02, pad_id: int = PAD_ID):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (<pad>, <unk>, ...), got {vocab_size}")
        self.pad_id = pad_id
        self.scale = float(scale)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        nn.init.normal_(self.embedding.weight, 0.0, init_std)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()
        self.fc = nn.Linear(embed_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, mask = _trim(x, self.pad_id)
        return F.relu(self.fc(self.scale * _masked_mean(self.embedding(x), mask)))


class TransformerTextEncoder(nn.Module):
    """A small Transformer encoder, mean-pooled over real tokens -> Linear -> ReLU."""

    def __init__(self, vocab_size: int, d_model: int = 128, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 256, dropout: float = 0.1, max_len: int = 512, out_dim: int = 256,
                 pad_id: int = PAD_ID):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (<pad>, <unk>, ...), got {vocab_size}")
        self.pad_id = pad_id
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.proj = nn.Linear(d_model, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, mask = _trim(x, self.pad_id)
        if x.shape[1] > self.max_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds the model's max_len {self.max_len}")
        # a text without tokens would have every key masked (NaN attention): let it attend to position 0
        attend = mask.clone()
        attend[:, 0] |= ~mask.any(1)
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.embedding(x) + self.position(positions)[None]
        h = self.encoder(h, src_key_padding_mask=~attend)
        return F.relu(self.proj(_masked_mean(h, attend)))


# FedTGP (fedhpro.methods.fedtgp)


class TrainablePrototypes(nn.Module):
    """The TGP generator: class id -> Embedding(C, d) -> Linear(d, d_h) -> ReLU -> Linear(d_h, d)."""

    def __init__(self, num_classes: int, feature_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or feature_dim
        self.embeddings = nn.Embedding(num_classes, feature_dim)
        self.middle = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU())
        self.fc = nn.Linear(hidden_dim, feature_dim)

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.middle(self.embeddings(class_ids)))


# GFPL (fedhpro.methods.gfpl)


class DualClassifierNet(nn.Module):
    """Extractor (any project model's `.features`) + projection layer -> normalised h scored by a fixed ETF,
    plus the learnable classifier W; `forward(x) -> (z, W logits)`, `.features(x) -> z`."""

    def __init__(self, base: nn.Module, projection_dim: int, num_classes: int, projection_bn: bool,
                 classifier_input: str, etf: torch.Tensor):
        super().__init__()
        self.base = base
        self.feature_dim = base.feature_dim
        layers: list[nn.Module] = [nn.Linear(base.feature_dim, projection_dim)]
        if projection_bn:
            layers.append(nn.BatchNorm1d(projection_dim))
        self.projector = nn.Sequential(*layers)
        self.classifier_input = classifier_input
        if classifier_input == "projection":
            base.classifier = nn.Linear(projection_dim, num_classes)
        self.register_buffer("etf", etf.clone(), persistent=False)

    @property
    def classifier(self) -> nn.Module:
        return self.base.classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.features(x)

    def heads(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit projected feature h (B, p), W logits (B, C)) from extractor features z."""
        g = self.projector(z)
        h = F.normalize(g, dim=1, eps=1e-8)
        logits = self.classifier(z if self.classifier_input == "feature" else g)
        return h, logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.features(x)
        return z, self.heads(z)[1]

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters retrained on pseudo-features: projection layer and W (the extractor stays frozen)."""
        return list(self.projector.parameters()) + list(self.classifier.parameters())


# The batched engine (fedhpro.batched): a torch function mode, defined here because it subclasses a torch class.
class MaskedBatchNorm(TorchFunctionMode):
    """Training-mode `F.batch_norm` over the rows where `self.mask` is true (padded batches under vmap).

    Statistics over valid rows only (biased variance to normalise, unbiased n/(n-1) for the running
    variance, as the kernel does), the running buffers updated in place; any other call passes through.
    """

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm or self.mask is None:
            return func(*args, **kwargs)
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        a = dict(zip(names, args), **kwargs)
        x, training = a["input"], a.get("training", False)
        if not training:
            return func(*args, **kwargs)
        momentum, eps = a.get("momentum", 0.1), a.get("eps", 1e-5)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        m = self.mask.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        count = self.mask.to(x.dtype).sum() * (x[0, 0].numel())
        mean = (x * m).sum(dims) / count
        centred = x - mean.view(shape)
        var = ((centred * m) ** 2).sum(dims) / count
        out = centred * torch.rsqrt(var.view(shape) + eps)
        if a.get("weight") is not None:
            out = out * a["weight"].view(shape)
        if a.get("bias") is not None:
            out = out + a["bias"].view(shape)
        running_mean, running_var = a.get("running_mean"), a.get("running_var")
        if running_mean is not None and momentum is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
                running_var.mul_(1 - momentum).add_(var.detach() * (count / (count - 1)) * momentum)
        return out
