"""The machine record: what every command writes to ``<run>/machines.jsonl`` and the report's line from it."""

from __future__ import annotations

import os

import pytest
import torch

from worldmodel import machine
from worldmodel.io import read_jsonl


def fake(rate: float, cpu: str = "Test CPU 9000") -> dict:
    return {"cpu": cpu, "cores": 2, "torch": "2.x", "threads": 2, "matmul_gflops": rate}


def test_describe_measures_this_machine_with_the_current_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        described = machine.describe(seconds=0.05)
    finally:
        torch.set_num_threads(before)
    assert described["threads"] == 1 and described["cores"] == os.cpu_count()
    assert described["torch"] == torch.__version__ and described["cpu"]
    assert 0.1 < described["matmul_gflops"] < 1e5  # a rate, in GFLOP/s


def test_a_record_is_written_only_into_a_run_folder_that_exists(tmp_path):
    machine.record(tmp_path / "absent", fake(50.0), "collect", 2)
    assert not (tmp_path / "absent").exists()  # a refused command leaves nothing behind
    machine.record(tmp_path, fake(50.0), "collect", 0)
    machine.record(tmp_path, fake(60.0), "train-vae", 130)
    rows = read_jsonl(tmp_path / machine.RECORD)
    assert [(row["command"], row["exit"], row["matmul_gflops"]) for row in rows] == [
        ("collect", 0, 50.0),
        ("train-vae", 130, 60.0),
    ]


@pytest.mark.parametrize(
    "recorded, current, warned",
    [([], None, None), ([50.0], None, False), ([50.0, 70.0], None, False), ([40.0], 164.0, True)],
)
def test_the_report_line_names_the_machine_and_flags_a_run_spread_over_machines(
    tmp_path, recorded, current, warned
):
    for rate in recorded:
        machine.record(tmp_path, fake(rate), "pipeline", 0)
    line = machine.summary_line(tmp_path, fake(current, "Other CPU") if current else None)
    if warned is None:
        assert line is None
        return
    shown = current or recorded[-1]
    assert f"matmul {shown:.0f} GFLOP/s" in line
    assert ("Other CPU" if current else "Test CPU 9000") in line
    assert ("this command" if current else "the last command") in line
    assert ("mix machines of different speeds" in line) == warned
    if warned:
        assert f"{min(recorded):.0f}-{current:.0f} GFLOP/s" in line


def test_run_py_records_the_machine_of_an_interrupted_command(tmp_path, run_main, monkeypatch):
    import run

    def interrupted(config):
        (tmp_path / "tiny").mkdir()  # the stage started its outputs
        raise KeyboardInterrupt

    original = run.resolve
    monkeypatch.setattr(
        run, "resolve", lambda target: interrupted if target == run.COMMANDS["encode"] else original(target)
    )
    result = run_main("encode", "--set", f"runs_dir={tmp_path}", "--set", "threads=1")
    assert result.returncode == 130 and "rerun the same command" in result.stderr
    (row,) = read_jsonl(tmp_path / "tiny" / machine.RECORD)
    assert (row["command"], row["exit"], row["threads"]) == ("encode", 130, 1)
