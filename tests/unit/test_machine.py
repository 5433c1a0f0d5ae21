"""The machine record: what every command writes to ``<run>/machines.jsonl`` and the report's line from it."""

from __future__ import annotations

import os

import pytest
import torch

from frmdn_worldmodels.runtime import machine
from frmdn_worldmodels.runtime.io import read_jsonl


def fake(rate: float, cpu: str = "Test CPU 9000", threads: int = 2) -> dict:
    return {"cpu": cpu, "cores": 2, "torch": "2.x", "threads": threads, "matmul_gflops": rate}


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


def test_a_record_is_written_only_for_work_in_a_run_folder_that_exists(tmp_path, capsys):
    machine.record(tmp_path / "absent", fake(50.0), "collect", 0)
    assert not (tmp_path / "absent").exists()  # a command that made nothing leaves nothing behind
    machine.record(tmp_path, fake(50.0), "collect", 0)
    machine.record(tmp_path, fake(55.0), "train-vae", 2)  # refused: no work to time
    machine.record(tmp_path, fake(60.0), "train-vae", 130)
    rows = read_jsonl(tmp_path / machine.RECORD)
    assert [(row["command"], row["exit"], row["matmul_gflops"]) for row in rows] == [
        ("collect", 0, 50.0),
        ("train-vae", 130, 60.0),
    ]
    blocked = tmp_path / "blocked"
    (blocked / machine.RECORD).mkdir(parents=True)
    machine.record(blocked, fake(50.0), "collect", 0)
    assert f"{blocked / machine.RECORD}: the machine record was not written" in capsys.readouterr().err


@pytest.mark.parametrize(
    "recorded, current, warned",
    [
        ([], None, None),
        ([fake(50.0)], None, False),
        ([fake(50.0), fake(70.0)], None, False),
        ([fake(40.0)], fake(164.0, "Other CPU"), True),
        ([fake(40.0, threads=1), fake(80.0)], None, False),  # one thread against two: not a mix of speeds
    ],
)
def test_the_report_line_names_the_machine_and_flags_a_run_of_mixed_speeds(
    tmp_path, recorded, current, warned
):
    for row in recorded:
        machine.record(tmp_path, row, "pipeline", 0)
    line = machine.summary_line(tmp_path, current)
    if warned is None:
        assert line is None
        return
    shown = current or recorded[-1]
    assert f"matmul {shown['matmul_gflops']:.0f} GFLOP/s" in line and shown["cpu"] in line
    assert ("this command" if current else "the last command") in line
    assert ("its stage times mix speeds" in line) == warned
    if warned:
        assert "2 commands on 2 threads measured 40-164 GFLOP/s" in line


def test_run_py_records_the_machine_of_an_interrupted_command(tmp_path, run_main, monkeypatch):
    from frmdn_worldmodels import cli

    def interrupted(config):
        (tmp_path / "tiny").mkdir()  # the stage started its outputs
        raise KeyboardInterrupt

    original = cli.resolve
    monkeypatch.setattr(
        cli,
        "resolve",
        lambda target: interrupted if target == cli.COMMANDS["encode"].run else original(target),
    )
    result = run_main("encode", "--set", f"runs_dir={tmp_path}", "--set", "threads=1")
    assert result.returncode == 130 and "rerun the same command" in result.stderr
    (row,) = read_jsonl(tmp_path / "tiny" / machine.RECORD)
    assert (row["command"], row["exit"], row["threads"]) == ("encode", 130, 1)

    def failing(config):
        raise RuntimeError("a bug")

    monkeypatch.setattr(
        cli, "resolve", lambda target: failing if target == cli.COMMANDS["encode"].run else original(target)
    )
    with pytest.raises(RuntimeError, match="a bug"):  # an unexpected error still reaches the user as is
        run_main("encode", "--set", f"runs_dir={tmp_path}", "--set", "threads=1")
    assert read_jsonl(tmp_path / "tiny" / machine.RECORD)[-1]["exit"] == 1
