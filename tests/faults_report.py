"""pytest plugin: a session-wide ledger of injected faults and one summary line at the end.

Registered in tests/conftest.py (`pytest_plugins = ["faults_report"]`). Tests take the `fault_ledger`
fixture and wrap each fault in `fault_ledger.fault(name, runs=...)`:

    with fault_ledger.fault("fedavg batch@17", runs=1) as fault:
        proc = run_with(FEDHPRO_FAULT="batch@17")
        assert proc.returncode == -signal.SIGKILL   # the fault really fired
        fault.injected()
        ...                                         # every check that the run survived it

A fault counts as injected once `injected()` is called, and as survived when the block then ends
without an exception. A failed check after the injection counts the fault as not survived and the
`runs` it put at risk as lost (unless the test said otherwise with `fault.lost(n)`). At the end of
the session the terminal summary prints, when anything was recorded,

    fault injection: 14 faults injected, 14 survived, 0 runs lost

followed by the faults that were not survived (and, with -v, every fault).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator

import pytest

_LEDGER = pytest.StashKey["FaultLedger"]()


@dataclass
class FaultRecord:
    name: str
    test: str
    runs: int = 1
    was_injected: bool = False
    survived: bool = False
    runs_lost: int = 0
    error: str = ""
    lost_if_failed: int | None = None

    def injected(self) -> None:
        """The fault really happened (e.g. the process died of SIGKILL at the fault point)."""
        self.was_injected = True

    def lost(self, runs: int) -> None:
        """Say how many runs were lost if the block fails (default: all `runs` at risk)."""
        self.lost_if_failed = runs


class FaultLedger:
    def __init__(self) -> None:
        self.records: list[FaultRecord] = []

    @contextlib.contextmanager
    def fault(self, name: str, *, runs: int = 1, test: str = "") -> Iterator[FaultRecord]:
        record = FaultRecord(name=name, test=test, runs=runs)
        try:
            yield record
        except BaseException as err:
            record.error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            record.runs_lost = record.runs if record.lost_if_failed is None else record.lost_if_failed
            raise
        else:
            record.survived = record.was_injected
        finally:
            if record.was_injected:
                self.records.append(record)

    def record(self, name: str, *, injected: bool = True, survived: bool = True, runs_lost: int = 0,
               test: str = "") -> None:
        """Record an outcome directly (when a context manager does not fit)."""
        if injected:
            self.records.append(FaultRecord(name=name, test=test, runs=max(runs_lost, 1), was_injected=True,
                                            survived=survived, runs_lost=runs_lost))

    @property
    def injected(self) -> int:
        return len(self.records)

    @property
    def survived(self) -> int:
        return sum(r.survived for r in self.records)

    @property
    def runs_lost(self) -> int:
        return sum(r.runs_lost for r in self.records)

    def summary(self) -> str:
        return (f"fault injection: {self.injected} faults injected, {self.survived} survived, "
                f"{self.runs_lost} runs lost")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LEDGER] = FaultLedger()


@pytest.fixture
def fault_ledger(request: pytest.FixtureRequest) -> Iterator[FaultLedger]:
    """The session's ledger; `fault(...)` records are tagged with the requesting test's id."""
    ledger = request.config.stash[_LEDGER]
    node = request.node.nodeid

    class _Tagged:
        def fault(self, name: str, *, runs: int = 1):
            return ledger.fault(name, runs=runs, test=node)

        def record(self, name: str, **kw):
            return ledger.record(name, test=node, **kw)

        def __getattr__(self, item):
            return getattr(ledger, item)

    yield _Tagged()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its records to the controller, which prints the one summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_records"] = [asdict(r) for r in session.config.stash[_LEDGER].records]


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: runs on the controller as each worker ends
def pytest_testnodedown(node, error) -> None:
    ledger = node.config.stash.get(_LEDGER, None)
    records = getattr(node, "workeroutput", {}).get("fault_records", [])
    if ledger is not None:
        ledger.records.extend(FaultRecord(**r) for r in records)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    ledger = config.stash.get(_LEDGER, None)
    if ledger is None or not ledger.records:
        return
    terminalreporter.write_sep("-", "fault injection")
    failed = [r for r in ledger.records if not r.survived]
    shown = ledger.records if terminalreporter.verbosity > 0 else failed
    for r in shown:
        state = "survived" if r.survived else f"NOT survived ({r.runs_lost} runs lost; {r.error})"
        terminalreporter.write_line(f"  {r.name}: {state}  [{r.test}]")
    terminalreporter.write_line(ledger.summary(), bold=True, red=bool(failed), green=not failed)
