"""The tests of ``tests/unit/test_bench_speech.py``'s subject that start Ray or a subprocess."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np

from tests.unit.test_bench_speech import ROOT, write_wavs


def test_cli_rejects_a_wav_with_a_wrong_sample_width(tmp_path):
    """The speech command's subprocess smoke test: a bad file of a real folder, refused with exit code 2."""
    folder = tmp_path / "wavs"
    write_wavs(folder, 4, np.random.default_rng(3))
    width = 8  # 64-bit PCM: the wave module reads the header, we refuse the width
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 16000 * width, width, 8 * width)
    data = bytes(100 * width)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    bad = folder / "utt99.wav"
    bad.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    command = [
        sys.executable,
        "run.py",
        "benchmark",
        "speech",
        "--data",
        str(folder),
        "--set",
        f"runs_dir={json.dumps(str(tmp_path / 'runs'))}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert f"error: {bad}: unsupported sample width of 8 bytes (64-bit)" in result.stderr
