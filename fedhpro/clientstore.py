"""Where per-client state lives between rounds (`client_store: memory | disk`).

A client's state is what a method keeps for it across rounds: its personalised model
(`eval_mode: personalized`), MOON's previous model, FedSA's local prototypes, and so on. With 1,000
clients and 10% participation, keeping every state in memory grows with every client ever sampled
(about 370 KiB per client for the digits CNN, 18 MiB for a ResNet-10) and every checkpoint holds all
of them. `DiskClientStore` keeps only the clients of the current round in memory, always on the CPU:

- the engine opens a client's state with `setdefault(cid, {})` (loaded from disk on demand), and
  `release(cid, round)` writes it to `<run_dir>/client_states/<cid>.r<round>.pt` (atomic, SHA-256
  header like checkpoints) and drops it from memory;
- `get(cid)` reads a state without keeping it (personalised evaluation walks every client this way);
- the checkpoint stores only the index {client: round of its file}, so its size follows the
  participating clients too; `commit()` after each checkpoint deletes files the index no longer
  names, and `load_state_dict` (resume) deletes files written after the checkpoint, by the rounds
  a crash interrupted. A resumed run therefore reads exactly the states the checkpoint saw and
  replays bit for bit. A finished run commits once more: `client_states/` then holds each client's
  final state.

`MemoryClientStore` is a plain dict with the same extra methods as no-ops; its checkpoint format is
the one runs have always written (`{"clients": {cid: state}}`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from fedhpro.payload import tensor_bytes
from fedhpro.runio import load_hashed, save_hashed

CLIENT_STATES_DIR = "client_states"


class MemoryClientStore(dict):
    """Every client's state in a dict (the default)."""

    def release(self, cid: int, round_idx: int) -> None:
        """Nothing to do: the state object itself is the stored one."""

    def commit(self) -> None:
        pass

    def reset(self) -> None:
        self.clear()

    def nbytes_in_memory(self) -> int:
        return tensor_bytes(dict(self))

    def state_dict(self) -> dict:
        return {"clients": {int(k): v for k, v in self.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        self.update({int(k): v for k, v in state["clients"].items()})


class DiskClientStore:
    """Client states as files in `root`; only the clients opened this round are in memory."""

    def __init__(self, root: str | Path | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="fedhpro-clients-") if root is None else None
        self.root = Path(self._tmp.name if self._tmp is not None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index: dict[int, int] = {}  # client -> round of its current file
        self.open: dict[int, dict] = {}  # states in use this round

    # ---- the dict-like part the engine and methods use -------------------------------------
    def _path(self, cid: int, round_idx: int) -> Path:
        return self.root / f"{cid}.r{round_idx}.pt"

    def _load(self, cid: int) -> dict:
        return load_hashed(self._path(cid, self.index[cid]))

    def setdefault(self, cid: int, default: dict) -> dict:
        cid = int(cid)
        if cid not in self.open:
            self.open[cid] = self._load(cid) if cid in self.index else default
        return self.open[cid]

    def get(self, cid: int, default: Any = None) -> Any:
        cid = int(cid)
        if cid in self.open:
            return self.open[cid]
        return self._load(cid) if cid in self.index else default

    def __getitem__(self, cid: int) -> dict:
        state = self.get(cid)
        if state is None:
            raise KeyError(cid)
        return state

    def __contains__(self, cid: object) -> bool:
        return cid in self.index or cid in self.open

    def __len__(self) -> int:
        return len(self.index.keys() | self.open.keys())

    def keys(self) -> list[int]:
        return sorted(self.index.keys() | self.open.keys())

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys())

    def values(self) -> Iterator[dict]:
        """Loads every state, one at a time (for inspection; the engine never calls this)."""
        return (self[cid] for cid in self.keys())

    def items(self) -> Iterator[tuple[int, dict]]:
        return ((cid, self[cid]) for cid in self.keys())

    # ---- persistence ---------------------------------------------------------------------------
    def release(self, cid: int, round_idx: int) -> None:
        """Write client `cid`'s state as of `round_idx` and drop it from memory."""
        cid = int(cid)
        state = self.open.pop(cid, None)
        if state is None:
            return
        save_hashed(self._path(cid, round_idx), state, fault="client_state_write")
        self.index[cid] = round_idx

    def commit(self) -> None:
        """After a checkpoint recorded `index`: delete every file it does not name (old versions, temps)."""
        keep = {self._path(cid, r).name for cid, r in self.index.items()}
        for path in self.root.iterdir():
            if path.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink() if not path.is_dir() else shutil.rmtree(path)

    def reset(self) -> None:
        """A run starting from round 1: forget everything, on disk too."""
        self.index.clear()
        self.open.clear()
        self.commit()

    def nbytes_in_memory(self) -> int:
        return tensor_bytes(self.open)

    def nbytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())

    def state_dict(self) -> dict:
        assert not self.open, "checkpoint taken while client states are open (mid-round)"
        return {"clients": {}, "client_index": dict(self.index)}

    def load_state_dict(self, state: dict) -> None:
        if "client_index" not in state:
            raise ValueError("checkpoint was written with client_store 'memory'; it cannot resume with 'disk'")
        self.open.clear()
        self.index = {int(k): int(v) for k, v in state["client_index"].items()}
        missing = [cid for cid, r in self.index.items() if not self._path(cid, r).is_file()]
        if missing:
            raise FileNotFoundError(f"client state files missing in {self.root} for clients {missing[:5]}"
                                    f"{' ...' if len(missing) > 5 else ''}; the checkpoint cannot be resumed")
        self.commit()  # files of rounds after the checkpoint (an interrupted run) are not part of this state


def make_client_store(kind: str, root: str | Path | None = None) -> MemoryClientStore | DiskClientStore:
    return MemoryClientStore() if kind == "memory" else DiskClientStore(root)
