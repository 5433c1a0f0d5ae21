"""The tests of ``tests/unit/test_bench_image.py``'s subject that start Ray or a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.unit.test_bench_image import ROOT, SMALL_CLI, write_image_folder


def cli(*args):
    command = [sys.executable, "run.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_cli_infers_mnist_and_cifar_from_the_data_folder(tmp_path, dataset):
    """The default image.dataset (auto) with --data: the folder's files say which data set it is."""
    data = write_image_folder(tmp_path / "data", dataset)
    runs = f"runs_dir={json.dumps(str(tmp_path / 'runs'))}"
    result = cli("benchmark", "image", "--data", str(data), "--set", runs, *SMALL_CLI)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dataset"] == dataset
    assert f"image.dataset=auto: {data} holds" in result.stderr
    assert summary["dims"] == (784 if dataset == "mnist" else 3072)
    assert summary["lambda"] == (1e-6 if dataset == "mnist" else 0.05)
    assert summary["levels"] == 256 and summary["results"][0]["bits_per_dim"] > 0
    table = (tmp_path / "runs" / "tiny" / "benchmarks" / "image" / "results.md").read_text()
    assert "as bits/dim on our test set" in table
