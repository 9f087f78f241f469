"""FINCH clustering (Sarfraz, Sharma, Stiefelhagen, "Efficient Parameter-free Clustering Using First
Neighbor Relations", CVPR 2019), as FPL (RethinkFL `utils/finch.py`) calls it.

Our own torch implementation of the algorithm, matching the reference code's behaviour for the
call FPL makes (`FINCH(data, distance='cosine', ensure_early_exit=False)`, exact first neighbours):

1. partition 0: link every point to its first (nearest, not itself) neighbour; clusters are the
   connected components of that graph taken as undirected (the reference's (A+I)(A+I)^T
   adjacency has the same components);
2. recursively: the cluster means (means of the original points, not of the previous means) are
   linked to their first neighbours in turn, and components of that graph merge clusters;
3. stop when a step would leave one cluster (or not reduce the count); that last step is dropped,
   so the coarsest partition returned has at least two clusters unless partition 0 already had one.

Clusters are numbered 0..k-1 in order of their smallest member index (scipy's
`connected_components` order). Ties in the first-neighbour search go to the lowest index (argmin).
Not implemented: the reference's `ensure_early_exit` distance cut, `req_clust` and the approximate
(PyNNDescent) neighbours for more than 70,000 points; FPL uses none of them.
"""

from __future__ import annotations

from fedhpro.lazy import lazy_module

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")

DISTANCES = ("cosine", "euclidean")


def pairwise_distance(x: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """(N, N) distances; cosine = 1 - cos (zero vectors are at distance 1 from everything, as sklearn)."""
    if distance == "cosine":
        u = F.normalize(x, dim=1)
        return (1.0 - u @ u.T).clamp_(0.0, 2.0)
    if distance == "euclidean":
        return torch.cdist(x, x)
    raise ValueError(f"unknown distance {distance!r}; accepted: {', '.join(DISTANCES)}")


def first_neighbours(x: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Index of each row's nearest other row (itself when it is the only row)."""
    d = pairwise_distance(x, distance)
    d.fill_diagonal_(float("inf"))
    return d.argmin(dim=1)  # a single row: argmin over [inf] = 0, itself


def connected_components(neighbour: torch.Tensor) -> torch.Tensor:
    """Component labels (0..k-1, ordered by smallest member) of the undirected graph i -- neighbour[i].

    Min-label propagation along the edges in both directions plus pointer jumping, vectorised.
    """
    n = len(neighbour)
    labels = torch.arange(n, device=neighbour.device)
    while True:
        new = torch.minimum(labels, labels[neighbour])
        new = new.scatter_reduce(0, neighbour, labels, reduce="amin")
        new = new[new]  # pointer jumping: a label is a node of the same component with a smaller index
        if torch.equal(new, labels):
            break
        labels = new
    return torch.unique(labels, return_inverse=True)[1]


def cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """(k, d) mean of the rows of each cluster."""
    k = int(labels.max()) + 1 if k is None else k
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    return sums / counts[:, None]


def finch(x: torch.Tensor, distance: str = "cosine") -> tuple[torch.Tensor, list[int]]:
    """FINCH partitions of the rows of `x` (N, d).

    Returns (partitions (N, P) long, finest first: column p holds each row's cluster in partition p;
    the number of clusters of each partition). FPL keeps the coarsest, `partitions[:, -1]`.
    """
    if x.dim() != 2 or len(x) == 0:
        raise ValueError(f"finch needs a non-empty (N, d) matrix, got shape {tuple(x.shape)}")
    x = x.detach().float()
    labels = connected_components(first_neighbours(x, distance))
    partitions, counts = [labels], [int(labels.max()) + 1]
    while counts[-1] > 1:
        means = cluster_means(x, partitions[-1], counts[-1])
        merged = connected_components(first_neighbours(means, distance))
        k = int(merged.max()) + 1
        if k == 1 or k >= counts[-1]:
            break  # the reference computes this partition, then drops it
        partitions.append(merged[partitions[-1]])
        counts.append(k)
    return torch.stack(partitions, dim=1), counts
