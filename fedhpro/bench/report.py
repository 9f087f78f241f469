"""The benchmark report: every figure printed with the machine, device, threads and torch version, PASS/FAIL
target lines, and the files `<out>/bench*.json` (one per section, plus a summary) and `<out>/bench*.md`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fedhpro.bench.common import BenchConfig


class Report:
    """Figures and targets by section, printed as they come and written at the end (`write`)."""

    def __init__(self, info: dict, cfg: BenchConfig):
        self.info = info
        self.cfg = cfg
        self.tag = f"{info['device']}, {info['threads']} thr, torch {info['torch']}, {info['cpu']}"
        if "gpu" in info:
            self.tag = f"{info['gpu']}, " + self.tag
        self.sections: dict[str, list[dict]] = {}
        self.slugs: dict[str, str] = {}
        self.checks: list[dict] = []
        self.data: dict[str, Any] = {}

    def header(self) -> None:
        i = self.info
        print(f"fedhpro bench [{self.cfg.name}]")
        print(f"machine: {i['platform']}; CPU: {i['cpu']} ({i['cpu_count']} logical cores); python {i['python']}")
        print(f"torch {i['torch']}; device {i['device']}{' (' + i['gpu'] + ')' if 'gpu' in i else ''}; "
              f"torch threads {i['threads']}; 1-min load average at start {i['loadavg_1min']}")
        sys.stdout.flush()

    def section(self, name: str, note: str = "", *, slug: str) -> None:
        self.sections.setdefault(name, [])
        self.slugs[name] = slug
        self._current = name
        print(f"\n== {name} ==" + (f"\n   {note}" if note else ""))

    def figure(self, label: str, value: str, raw: Any = None, note: str = "") -> None:
        row = {"figure": label, "value": value, "raw": raw, "note": note, "context": self.tag}
        self.sections[self._current].append(row)
        print(f"  {label:<58} {value:>22}   [{self.tag}]" + (f"  ({note})" if note else ""))
        sys.stdout.flush()

    def check(self, label: str, passed: bool | None, detail: str) -> None:
        status = "PASS" if passed else ("FAIL" if passed is not None else "N/A")
        self.checks.append({"target": label, "status": status, "detail": detail, "context": self.tag})
        print(f"  {status}: {label} -- {detail}   [{self.tag}]")
        sys.stdout.flush()

    def write(self, out: Path, pending: list[str]) -> list[Path]:
        """Write every section measured so far; `pending` names the sections still to run: the summary JSON says
        `"complete": false` and the Markdown opens with a line naming them, so a benchmark cut short (a time
        limit, a crash) never leaves files that look complete. Each file is replaced atomically."""
        out.mkdir(parents=True, exist_ok=True)
        written = []
        stem = "bench" if self.cfg.name == "cpu-digits-cnn" else f"bench_{self.cfg.name}"
        for name, rows in self.sections.items():
            path = out / f"{stem}_{self.slugs[name]}.json"
            _write(path, json.dumps({"machine": self.info, "config": self.cfg.name, "section": name,
                                     "figures": rows, "data": self.data.get(self.slugs[name])}, indent=2, default=str))
            written.append(path)
        path = out / f"{stem}.json"
        _write(path, json.dumps({"complete": not pending, "pending_sections": pending, "machine": self.info,
                                 "config": self.cfg.__dict__, "sections": self.sections, "checks": self.checks,
                                 "data": self.data}, indent=2, default=str))
        written.append(path)
        md = [f"# fedhpro bench: {self.cfg.name}", ""]
        if pending:
            md += [f"**Incomplete: the benchmark stopped before section(s) {', '.join(pending)}; the figures below "
                   "are those measured so far.**", ""]
        md += [
              f"Machine: {self.info['platform']}; CPU: {self.info['cpu']} ({self.info['cpu_count']} logical cores); "
              f"torch {self.info['torch']}; device {self.info['device']}"
              f"{' (' + self.info['gpu'] + ')' if 'gpu' in self.info else ''}; torch threads {self.info['threads']}; "
              f"1-min load average at start {self.info['loadavg_1min']}.", "",
              f"Every figure below: [{self.tag}].", ""]
        for name, rows in self.sections.items():
            md += [f"## {name}", "", "| figure | value | note |", "| --- | ---: | --- |"]
            md += [f"| {r['figure']} | {r['value']} | {r['note']} |" for r in rows]
            md.append("")
        md += ["## Targets", "", "| status | target | measured |", "| --- | --- | --- |"]
        md += [f"| {c['status']} | {c['target']} | {c['detail']} |" for c in self.checks]
        path = out / f"{stem}.md"
        _write(path, "\n".join(md) + "\n")
        written.append(path)
        return written


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

