"""Text backbones for token-id inputs (N x L int64, 0 = padding), trained from scratch.

The registry `TEXT_BACKBONES`; the encoder classes are in `fedhpro.nets` (imported when a model
is built, so that naming text models needs no torch). Builders follow `fedhpro.models.BACKBONES`:
`build(in_channels, *, vocab_size, **kw) -> (module, out_dim)`. `in_channels` is ignored (the engine passes 0 for non-image inputs);
`vocab_size` comes from the dataset (`ArrayData.model_kwargs`, e.g. AG News).

* `text_embedding_bag`: an EmbeddingBag-style encoder (the PyTorch/torchtext text
  classification model, as used by HtFLlib's fastText-like AG News baselines):
  token embeddings (dim 64) averaged over the non-padding tokens, times a constant
  `scale` (32) -> Linear -> ReLU, 256-d non-negative features (like ResNet10's, which
  the prototype methods expect). A text with no token (all padding) gets a zero mean.
  Embeddings start at N(0, 0.02^2) (the padding row at 0). The constant scale is a
  reparametrisation: it is the plain mean model with embeddings initialised at
  N(0, 0.64^2) whose learning rate is scale^2 = 1024 times the others'. Plain SGD at
  the learning rates used for images (0.05-0.1) otherwise barely moves the embeddings
  (each row gets 1/length of a text's gradient): on 6,080 AG News texts one epoch at
  lr 0.1 reaches about 0.72 test accuracy this way against 0.37 without it.
* `text_transformer`: a small Transformer encoder (2 layers, d_model 128, 4 heads,
  feed-forward 256, dropout 0.1, learned absolute position embeddings up to 512
  tokens, post-norm as `nn.TransformerEncoderLayer`), padding masked in attention,
  mean-pooled over the non-padding tokens -> Linear -> ReLU, 256-d.

Both drop trailing all-padding columns of a batch before the forward pass (a pure
speed-up: padded positions are masked, so the result is the same).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from fedhpro.lazy import lazy_module

if TYPE_CHECKING:
    from torch import nn

nets = lazy_module("fedhpro.nets")  # the encoders (torch): imported when a model is built


def build_embedding_bag(in_channels: int, *, vocab_size: int, **kw) -> tuple[nn.Module, int]:
    net = nets.EmbeddingBagEncoder(vocab_size, **kw)
    return net, net.out_dim


def build_transformer(in_channels: int, *, vocab_size: int, **kw) -> tuple[nn.Module, int]:
    net = nets.TransformerTextEncoder(vocab_size, **kw)
    return net, net.out_dim


TEXT_BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "text_embedding_bag": build_embedding_bag,
    "text_transformer": build_transformer,
}
