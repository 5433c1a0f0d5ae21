"""The speech benchmark on small wav folders written here: reading, splitting, normalising, the per-sequence
NLL with padding, an end-to-end run, and bad input on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from frmdn_worldmodels.benchmarks.common import benchmark_memory_config
from frmdn_worldmodels.benchmarks.datasets import encode_wav_bytes
from frmdn_worldmodels.benchmarks.speech import (
    length_batches,
    load_speech_corpus,
    pad_batch,
    run,
    sequence_nll,
)
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import load_config
from frmdn_worldmodels.runtime.io import DataError
from tests.unit.test_bench_common import record_models

ROOT = Path(__file__).resolve().parents[2]


def write_wavs(folder: Path, count: int, rng, rate=16000, seconds=(0.2, 0.5)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        n = int(rng.uniform(*seconds) * rate)
        t = np.arange(n) / rate
        signal = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.05 * rng.standard_normal(n) + 0.1
        path = folder / f"utt{i:02d}.wav"
        path.write_bytes(encode_wav_bytes(signal, rate))
        paths.append(path)
    return paths


def speech_config(tmp_path, data, *overrides):
    return load_config(
        None,
        [
            f"runs_dir={json.dumps(str(tmp_path / 'runs'))}",
            f"speech.data={json.dumps(str(data))}",
            "speech.memory.hidden=8",
            "speech.memory.components=2",
            "speech.memory.flow_hidden=8",
            "speech.epochs=2",
            "speech.batch_size=4",
            "speech.threads=1",
            *overrides,
        ],
    )


def test_corpus_random_split_and_normalisation(tmp_path):
    write_wavs(tmp_path / "wavs", 40, np.random.default_rng(0))
    cfg = speech_config(tmp_path, tmp_path / "wavs")
    corpus = load_speech_corpus(cfg.speech, seed=0)
    assert corpus.layout == "random" and corpus.files == {"train": 36, "val": 2, "test": 2}
    train = np.concatenate([s.ravel() for s in corpus.sequences["train"]])
    assert abs(train.mean()) < 1e-5 and train.std() == pytest.approx(1.0, abs=1e-5)
    assert corpus.mean == pytest.approx(0.1, abs=0.01)
    assert all(s.shape[1] == 200 and s.dtype == np.float32 for s in corpus.sequences["test"])
    again = load_speech_corpus(cfg.speech, seed=0)
    np.testing.assert_array_equal(again.sequences["test"][0], corpus.sequences["test"][0])


def test_corpus_clips_resampling_and_timit_layout(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "TIMIT"
    for split, count in (("TRAIN", 20), ("TEST", 3)):
        write_wavs(root / split / "DR1" / f"SPK{split}", count, rng, rate=8000, seconds=(1.1, 1.3))
    cfg = speech_config(tmp_path, root, "speech.clip_seconds=0.5")
    corpus = load_speech_corpus(cfg.speech, seed=0)
    assert corpus.name == "TIMIT" and corpus.layout == "timit"
    assert corpus.files["test"] == 3 and corpus.files["train"] + corpus.files["val"] == 20
    assert corpus.notes == ["resampled 23 file(s) from 8000 Hz to 16000 Hz"]
    # 1.1-1.3 s at 16 kHz is 88-104 frames of 200: two clips of 40 frames per file.
    assert len(corpus.sequences["test"]) == 6 and all(s.shape == (40, 200) for s in corpus.sequences["test"])


def test_padding_does_not_change_a_sequence_nll():
    torch.manual_seed(0)
    model = MemoryModel(10, 0, benchmark_memory_config("frmdn", 8, 2, 0, 2, 8)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    rng = np.random.default_rng(0)
    sequences = [rng.standard_normal((n, 10)).astype(np.float32) for n in (3, 7, 1, 5)]
    batched = sequence_nll(model, sequences, batch_size=4, device="cpu")
    for sequence, value in zip(sequences, batched, strict=True):
        with torch.no_grad():
            y = torch.cat([torch.zeros(1, 10), torch.from_numpy(sequence)])[None]
            alone = -model.sequence_log_prob(y)[0].sum().item()
        assert value == pytest.approx(alone, rel=1e-5, abs=1e-4)
    y, mask = pad_batch(sequences[:2], "cpu")
    assert y.shape == (2, 8, 10) and mask.sum().item() == 10 and torch.equal(y[0, 4:], torch.zeros(4, 10))


def test_length_batches_cover_every_sequence_once():
    lengths = list(np.random.default_rng(0).integers(1, 50, 103))
    batches = length_batches(lengths, 8, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    assert max(len(b) for b in batches) == 8


def test_speech_run_end_to_end_and_rerun(tmp_path):
    write_wavs(tmp_path / "wavs", 24, np.random.default_rng(2), seconds=(0.1, 0.3))
    cfg = speech_config(tmp_path, tmp_path / "wavs")
    summary = run(cfg)
    out = tmp_path / "runs" / "tiny" / "benchmarks" / "speech"
    for name in (
        "results.md",
        "results.csv",
        "summary.json",
        "models/frmdn_r0/metrics.jsonl",
        "nll_curves.png",
        "models/frmdn_r0/best.pt",
    ):
        assert (out / name).exists(), name
    assert [r["model"] for r in summary["results"]] == ["RMDN (K=2)", "FRMDN (K=2)"]
    for row in summary["results"]:
        assert row["nll_per_sample"] == pytest.approx(
            row["nll_per_sequence"] * summary["sequences"]["test"] / summary["test_samples"]
        )
    table = (out / "results.md").read_text()
    assert "normalised units" in table and "-32505" in table and "FRMDN (K=2)" in table
    before = (out / "models" / "frmdn_r0" / "metrics.jsonl").read_text()
    again = run(cfg)
    assert (out / "models" / "frmdn_r0" / "metrics.jsonl").read_text() == before
    assert again["results"] == summary["results"]


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="--data PATH"):
        load_speech_corpus(load_config(None, []).speech, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no .wav files"):
        load_speech_corpus(speech_config(tmp_path, tmp_path / "empty").speech, seed=0)


def test_cli_refuses_a_missing_folder_and_bad_memory_settings_before_any_work(tmp_path, run_main):
    missing = tmp_path / "no" / "such" / "dir"
    cases = (
        (("--data", str(missing)), f"error: {missing}: the speech data folder does not exist"),
        (
            ("--data", str(tmp_path), "--set", "speech.memory.predict_done=true"),
            "error: speech.memory.predict_done must be false",
        ),
        (
            ("--data", str(tmp_path), "--set", "speech.memory.kind=frmdn"),
            "error: speech.memory.kind='frmdn' would be ignored: each model takes its kind from speech.kinds",
        ),
    )
    for args, message in cases:
        result = run_main(
            "benchmark", "speech", "--set", f"runs_dir={json.dumps(str(tmp_path / 'runs'))}", *args
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "runs").exists(), "a refused command must write nothing"


def test_memory_settings_reach_the_speech_models(tmp_path, monkeypatch):
    import frmdn_worldmodels.benchmarks.speech

    built = record_models(monkeypatch, frmdn_worldmodels.benchmarks.speech)
    write_wavs(tmp_path / "wavs", 20, np.random.default_rng(4), seconds=(0.1, 0.2))
    summary = run(
        speech_config(
            tmp_path,
            tmp_path / "wavs",
            "speech.epochs=1",
            "speech.kinds=[frmdn]",
            "speech.memory.flow_context=true",
            "speech.memory.diag_clamp=[0.05, 20]",
            "speech.memory.components=3",
        )
    )
    (model,) = built
    assert (
        model.config.flow_context and model.config.diag_clamp == [0.05, 20.0] and model.flow.context_dim == 8
    )
    assert (model.config.kind, model.config.rank, model.config.components) == ("frmdn", 0, 3)
    assert model.reward_head is None and model.done_head is None
    assert [row["model"] for row in summary["results"]] == ["FRMDN (K=3)"]
