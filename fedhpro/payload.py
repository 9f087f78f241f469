"""Communication accounting: the bytes of a payload's tensors, less its declared header metadata."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fedhpro.lazy import lazy_module

torch = lazy_module("torch")

# Upload keys the engine itself adds: the sample count (aggregation weight) and the client id.
ENGINE_METADATA = ("num_samples", "cid")


def tensor_bytes(obj: Any, metadata: Collection[str] = ()) -> int:
    """Bytes of every tensor in a (nested) payload: what would travel over the wire.

    Entries under a key in `metadata` (at any depth) are header metadata and not counted: the engine's
    `ENGINE_METADATA` and what a method declares (`ClientBase.UPLOAD_METADATA`,
    `ServerBase.BROADCAST_METADATA`: e.g. the class ids of prototype rows), so payload sizes match the
    papers' formulas (e.g. FedProto's upload: local classes x d x 4 bytes).
    """
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, metadata) for k, v in obj.items() if k not in metadata)
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, metadata) for v in obj)
    return 0
