"""Augmentation on tensors (no PIL, no DataLoader), reproducible through a torch.Generator.

`crop_flip` is torchvision's RandomCrop(size, padding) + RandomHorizontalFlip.
The official FedHPro code applies those transforms to the whole batch tensor,
so one crop offset and one flip decision are shared by every image of a batch
(quirk 7 in `docs/fedhpro-official-code.md`); `per_sample=True` gives the usual per-image behaviour.
As in the official code the input is already normalised, so padding is zero in
normalised space.
"""

from __future__ import annotations

from fedhpro.lazy import lazy_module

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


def _randint(high: int, size: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, (size,), generator=gen, device=gen.device).to(device)


def crop_flip(x: torch.Tensor, gen: torch.Generator, *, per_sample: bool, padding: int = 4,
              flip: bool = True, crop: bool = True) -> torch.Tensor:
    b, _, h, w = x.shape
    n = b if per_sample else 1
    if crop and padding > 0:
        dy = _randint(2 * padding + 1, n, gen, x.device)
        dx = _randint(2 * padding + 1, n, gen, x.device)
        padded = F.pad(x, (padding, padding, padding, padding))
        if per_sample:
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # b,1,h,1
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # b,1,1,w
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        else:
            y0, x0 = int(dy[0]), int(dx[0])
            x = padded[:, :, y0:y0 + h, x0:x0 + w]
    if flip:
        coin = torch.rand((n,), generator=gen, device=gen.device).to(x.device) < 0.5
        if per_sample:
            x = torch.where(coin[:, None, None, None], x.flip(3), x)
        elif bool(coin[0]):
            x = x.flip(3)
    return x.contiguous()


def apply_augment(name: str, x: torch.Tensor, gen: torch.Generator, *, per_sample: bool) -> torch.Tensor:
    if name == "none":
        return x
    if name == "crop_flip":
        return crop_flip(x, gen, per_sample=per_sample, padding=max(1, x.shape[-1] // 8))
    if name == "flip":
        return crop_flip(x, gen, per_sample=per_sample, crop=False)
    raise ValueError(f"unknown augmentation {name!r}")
