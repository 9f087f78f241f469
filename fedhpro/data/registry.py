"""The dataset registry's types: `ArrayData` (what a loader returns), `DatasetSpec` (a registered dataset)
and `register`/`DATASETS`. A module of its own so that the loader modules import it, not the package
`fedhpro.data`, which imports them to register them (no import cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from fedhpro.lazy import lazy_module

torch = lazy_module("torch")


@dataclass
class ArrayData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None  # per-channel, on the [0, 1] scale; None: inputs are not images
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] = ()
    # feature-shift datasets: the domain id of every sample and the domains' names
    train_domain: torch.Tensor | None = None
    test_domain: torch.Tensor | None = None
    domain_names: tuple[str, ...] = ()
    # extra keyword arguments for the model builder (e.g. a text model's vocab_size)
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.train_x) != len(self.train_y) or len(self.test_x) != len(self.test_y):
            raise ValueError("samples and labels differ in length")
        if self.train_y.dtype != torch.int64 or self.test_y.dtype != torch.int64:
            raise ValueError("labels must be int64")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    loader: Callable[..., ArrayData]  # loader(root: Path, **options) -> ArrayData
    default_model: str
    default_augment: str = "none"
    train_size: int | None = None  # known size, for early config validation
    domains: tuple[str, ...] = ()
    downloads: tuple = field(default=())  # fedhpro.download.RemoteFile entries
    description: str = ""
    # Download step hooks (workflow rule `download`), both optional:
    # downloads_for(options) -> the files of `downloads` that a run with these loader options needs
    #     (None: all of them), e.g. digit_domains fetches only the requested domains' files;
    # local_copies(root, remotes, mirror) -> {file name: path} for those of `remotes` the loader already
    #     finds locally, which the download step then does not fetch: outside <root>/<name>/raw/ only
    #     copies that verify (`prepare` checks raw/ itself); a file with no checksum at all counts
    #     wherever the loader finds it (None: see find_local_copies).
    downloads_for: Callable[[Mapping[str, Any]], tuple] | None = None
    # check_options(options) raises ConfigError naming `dataset_options.<key>` for values the loader cannot use
    # (config validation calls it, so a workflow refuses them at load; None: the loader's own checks only)
    check_options: Callable[[Mapping[str, Any]], None] | None = None
    local_copies: Callable[..., dict] | None = None

    def needed_downloads(self, options: Mapping[str, Any] | None = None) -> tuple:
        """The files of `downloads` a run with these loader options needs (all without a hook); none when
        the data is given by `path` (the loader reads that folder or archive and never the download)."""
        if (options or {}).get("path") is not None:
            return ()
        if self.downloads_for is None:
            return tuple(self.downloads)
        wanted = {r.filename for r in self.downloads_for(dict(options or {}))}
        return tuple(r for r in self.downloads if r.filename in wanted)

    def find_local_copies(self, root: str | Path, remotes, mirror: Mapping | None = None) -> dict[str, Path]:
        """{file name: path} of the `remotes` the download step need not fetch (the local_copies hook);
        without a hook: the files with no checksum to verify them (upstream or mirror) that were placed
        by hand in <root>/<name>/raw/ (`prepare` would refuse to fetch them)."""
        if self.local_copies is not None:
            return dict(self.local_copies(Path(root), tuple(remotes), mirror))
        from fedhpro.download import mirror_checksum

        raw = Path(root) / self.name / "raw"
        return {r.filename: raw / r.filename for r in remotes
                if mirror_checksum(r, mirror) is None and (raw / r.filename).exists()}


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} registered twice")
    DATASETS[spec.name] = spec
    return spec
