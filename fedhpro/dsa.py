"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021) as used by CReFF and FedHPro.

The official code (`utils/param_aug.py`, mode 'S', strategy
'color_crop_cutout_flip_scale_rotate') picks one augmentation family at
random per call and, because a seed is given, applies one set of parameters
to every image of the batch. It draws from the global torch RNG reseeded with
the wall clock (quirk 8, `docs/fedhpro-official-code.md`); we draw from the caller's generator instead, so runs
are deterministic. Parameters: flip 0.5, scale 1.2, rotate 15 deg, crop-pad
0.125 (after a 1-pixel zero pad, with clamped indices, as in the code), cutout
0.5, brightness 1.0, saturation 2.0, contrast 0.5.
"""

from __future__ import annotations

import math

from fedhpro.lazy import lazy_module

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")

STRATEGY = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _u(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def _crop(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    _, _, h, w = x.shape
    sx, sy = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    tx = int(torch.randint(-sx, sx + 1, (), generator=gen))
    ty = int(torch.randint(-sy, sy + 1, (), generator=gen))
    rows = torch.clamp(torch.arange(h, device=x.device) + tx + 1, 0, h + 1)
    cols = torch.clamp(torch.arange(w, device=x.device) + ty + 1, 0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[:, :, rows][:, :, :, cols]


def _cutout(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    _, _, h, w = x.shape
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    ox = int(torch.randint(0, h + (1 - ch % 2), (), generator=gen))
    oy = int(torch.randint(0, w + (1 - cw % 2), (), generator=gen))
    mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
    r0, c0 = max(ox - ch // 2, 0), max(oy - cw // 2, 0)
    r1, c1 = min(ox - ch // 2 + ch, h), min(oy - cw // 2 + cw, w)
    mask[r0:r1, c0:c1] = 0
    return x * mask


def siamese_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One randomly chosen DSA family, one parameter set for the whole batch."""
    family = STRATEGY[int(torch.randint(0, len(STRATEGY), (), generator=gen))]
    if family == "color":
        x = x + (_u(gen) - 0.5) * 1.0
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_u(gen) * 2.0) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (_u(gen) + 0.5) + mean
    if family == "crop":
        return _crop(x, gen)
    if family == "cutout":
        return _cutout(x, gen)
    if family == "flip":
        return x.flip(3) if _u(gen) < 0.5 else x
    if family == "scale":
        sx, sy = (_u(gen) * (1.2 - 1 / 1.2) + 1 / 1.2 for _ in range(2))
        return _affine(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])
    theta = (_u(gen) - 0.5) * 2 * 15.0 / 180 * math.pi
    return _affine(x, [[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])
