"""Gradient pieces shared by CReFF and FedHPro, vectorised over classes.

Client side: for each local class c, a batch of up to `real_batch` real samples
goes through the frozen feature extractor (eval mode); with logits
W z + b and CE averaged over the n_c samples, the closed forms are

    dL/dz_i = (1/n_c) W^T (p_i - e_c)          (rows of FedHPro's feature gradient)
    dL/dW   = (1/n_c) sum_i (p_i - e_c) z_i^T,  dL/db = (1/n_c) sum_i (p_i - e_c)

and FedHPro's `truth_gradient[c]` is the mean over samples of dL/dz_i (so it
carries 1/n_c twice; `docs/fedhpro-official-code.md` 2.1). All classes are handled in one batched pass;
`tests/test_gradients.py` checks these against the per-class autograd loop of
the official code.

Distances (`utils/gradient_matching.py`):
- `matching` on FedHPro's d-vectors loops over *scalar* entries:
  sum_i [1 - a_i s_i / (|a_i||s_i| + 1e-6)] (quirk 1);
- `matching` on CReFF's classifier gradients is the layer-wise `distance_wb`:
  for W, sum over rows of (1 - cos); for b, one (1 - cos) term;
- `cos`: 1 - <a, s> / (||a|| ||s|| + 1e-6) over the whole flattened gradient;
- `mse`: sum of squared differences.
"""

from __future__ import annotations

from fedhpro.lazy import lazy_module

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")

EPS = 1e-6


def class_gradients(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per present class: mean feature-gradient (k, d), dL/dW (k, C, d), dL/db (k, C).

    `features` (n, d) are the real samples of all classes in `classes` (k,),
    `labels` (n,) their classes. CE is averaged within each class.
    """
    logits = features @ weight.T + bias
    residual = torch.softmax(logits, dim=1) - F.one_hot(labels, weight.shape[0]).to(logits.dtype)  # p_i - e_c
    member = (labels[:, None] == classes[None, :]).to(logits.dtype)  # n x k
    counts = member.sum(0)  # n_c
    per_sample = residual / counts[member.argmax(1)][:, None]  # (1/n_c)(p_i - e_c)
    grad_db = member.T @ per_sample  # k x C
    grad_dw = torch.einsum("nk,nc,nd->kcd", member, per_sample, features)
    feature_grad = (member.T @ (per_sample @ weight)) / counts[:, None]  # mean_i dL/dz_i
    return feature_grad, grad_dw, grad_db


def soft_sign_distance(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """Official `matching` distance on vectors: element-wise, summed over the last dim."""
    return (1 - real * syn / (real.abs() * syn.abs() + EPS)).sum(-1)


def cosine_distance(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """1 - cos over the last dim (the whole-vector cosine of `--dis_metric cos`)."""
    return 1 - (real * syn).sum(-1) / (real.norm(dim=-1) * syn.norm(dim=-1) + EPS)


def mse_distance(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    return ((syn - real) ** 2).sum(-1)


def vector_distance(name: str, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """Distance between FedHPro's class feature-gradients (k, d) -> (k,)."""
    if name == "matching":
        return soft_sign_distance(real, syn)
    if name == "cos":
        return cosine_distance(real, syn)
    if name == "mse":
        return mse_distance(real, syn)
    raise ValueError(f"unknown distance {name!r}")


def classifier_gradient_distance(name: str, real_dw: torch.Tensor, real_db: torch.Tensor, syn_dw: torch.Tensor,
                                 syn_db: torch.Tensor) -> torch.Tensor:
    """CReFF's `match_meta` between (k, C, d)/(k, C) gradient sets -> (k,)."""
    if name == "matching":  # distance_wb: rows of W, and b as one row
        return cosine_distance(real_dw, syn_dw).sum(-1) + cosine_distance(real_db, syn_db)
    real = torch.cat([real_dw.flatten(1), real_db], dim=1)
    syn = torch.cat([syn_dw.flatten(1), syn_db], dim=1)
    return cosine_distance(real, syn) if name == "cos" else mse_distance(real, syn)


def synthetic_gradients(points: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable CE gradients of synthetic points, `group` consecutive rows per class.

    `points` is (k*group, d), rows [j*group, (j+1)*group) all labelled labels[j*group].
    Returns, per class block: the mean over rows of dL/ds (k, d), dL/dW (k, C, d), dL/db (k, C),
    with CE averaged over the block, i.e. what `autograd.grad(..., create_graph=True)` gives
    class by class in the official code.
    """
    logits = points @ weight.T + bias
    residual = (torch.softmax(logits, dim=1) - F.one_hot(labels, weight.shape[0]).to(logits.dtype)) / group
    k = points.shape[0] // group
    res = residual.view(k, group, -1)
    pts = points.view(k, group, -1)
    point_grad = (res @ weight).mean(1)  # avg over the block of rows (1/group) W^T (p - e)
    grad_dw = res.transpose(1, 2) @ pts  # k x C x d
    grad_db = res.sum(1)
    return point_grad, grad_dw, grad_db
