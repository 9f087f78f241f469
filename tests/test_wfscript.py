"""The Snakemake scripts' shared preamble (fedhpro.wfscript.run_script): output into the rule's log, one
line for Snakemake on failure with the traceback in the log."""

import logging
import sys
from types import SimpleNamespace

import pytest

from fedhpro.wfscript import run_script


def fake_sm(tmp_path, rule="partition"):
    return SimpleNamespace(rule=rule, log=[str(tmp_path / f"{rule}.log")])


def test_output_and_package_logging_go_to_the_log(tmp_path, capsys):
    sm = fake_sm(tmp_path)

    def job(sm):
        print("to stdout")
        print("to stderr", file=sys.stderr)
        logging.getLogger("fedhpro.jobs").info("a package message")

    run_script(sm, job)
    text = (tmp_path / "partition.log").read_text()
    assert "to stdout" in text and "to stderr" in text and "INFO:fedhpro.jobs:a package message" in text
    assert capsys.readouterr() == ("", "")  # nothing reaches Snakemake's own output
    assert not logging.getLogger("fedhpro").handlers  # the handler is removed again


def test_a_failure_is_one_line_naming_rule_and_log_with_the_traceback_in_the_log(tmp_path):
    sm = fake_sm(tmp_path, "download")

    def job(sm):
        raise ValueError("digits has no download files ['x']")

    with pytest.raises(SystemExit) as exc:
        run_script(sm, job)
    log = tmp_path / "download.log"
    assert exc.value.code == f"download failed: digits has no download files ['x'] (full log: {log})"
    assert "Traceback" in log.read_text() and "ValueError" in log.read_text()


def test_a_nonzero_status_is_a_failure(tmp_path):
    with pytest.raises(SystemExit, match=r"^aggregate failed: exited with status 2 \(full log: "):
        run_script(fake_sm(tmp_path, "aggregate"), lambda sm: 2)
    run_script(fake_sm(tmp_path, "aggregate"), lambda sm: 0)  # 0 / None: success


def test_an_interrupt_is_one_line_without_a_traceback(tmp_path, capsys):
    """Ctrl-C mid-job: not `train failed:  (full log: ...)` with an empty reason, and no traceback in the log
    (which a user reads next); the exit status is the shell's 130."""
    def job(sm):
        print("round 1 done")
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_script(fake_sm(tmp_path, "train"), job)
    assert exc.value.code == 130
    assert capsys.readouterr().err == "train: interrupted; rerun the same command to resume\n"
    text = (tmp_path / "train.log").read_text()
    assert text == "round 1 done\ntrain: interrupted; rerun the same command to resume\n"
    assert not logging.getLogger("fedhpro").handlers


def test_an_exception_without_a_message_is_named_by_its_type(tmp_path):
    def job(sm):
        raise MemoryError

    with pytest.raises(SystemExit) as exc:
        run_script(fake_sm(tmp_path, "train"), job)
    assert exc.value.code == f"train failed: MemoryError (full log: {tmp_path / 'train.log'})"


def test_a_cli_refusal_inside_the_job_is_the_reason_on_the_console(tmp_path):
    """A job that runs a CLI which prints its one-line `error: ...` and returns 2 (fedhpro.aggregate refusing a
    swapped metrics.parquet): the console line says why, not only 'exited with status 2'."""
    def job(sm):
        print("collecting 4 runs")
        print("error: metrics file r/metrics.parquet belongs to another run (config_hash a, but r/config.json says b)",
              file=sys.stderr)
        raise RuntimeError("fedhpro.aggregate exited with status 2")

    with pytest.raises(SystemExit) as exc:
        run_script(fake_sm(tmp_path, "aggregate"), job)
    log = tmp_path / "aggregate.log"
    assert exc.value.code == ("aggregate failed: metrics file r/metrics.parquet belongs to another run (config_hash a, "
                              "but r/config.json says b) (fedhpro.aggregate exited with status 2) "
                              f"(full log: {log})")
    assert "error: metrics file" in log.read_text()
