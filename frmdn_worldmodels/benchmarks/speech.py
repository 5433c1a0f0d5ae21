r"""Speech NLL benchmark (FRMDN paper, Table 2): ``python run.py benchmark speech --data PATH``.

Every ``.wav`` under PATH (TIMIT, Blizzard, Accent: folders of wavs; TIMIT's original NIST SPHERE ``.WAV``
files are read too) is converted to mono at ``speech.sample_rate`` (16 kHz; other rates are resampled, with a
note) and cut into frames of ``speech.frame`` = 200 samples; each file is one sequence, or consecutive clips
of ``speech.clip_seconds`` (0.5 s for Accent and Blizzard, as VRNN and the paper did). Samples are normalised
by the training set's global mean and standard deviation.

Split: TIMIT's own TRAIN/TEST when that layout is found (5% of TRAIN, by file, is held out for validation);
otherwise a seeded random 90/5/5 split by file (clips of one file never straddle two splits).

The memory model reads the previous frame (zeros before the first) and predicts the next one:
:math:`\log p(x) = \sum_t \log p(x_t \mid x_{<t})`. We report the test NLL per sequence (the sum over frames,
in nats, in *normalised units*, as VRNN and the paper do) and per sample (the total over the test set divided
by its number of samples). The models are ``speech.kinds`` x ``speech.ranks``, all with the settings of
``speech.memory``. Normalised units: the density of the waveform divided by its std, so the figures
depend on that std and compare only on the same data and normalisation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from frmdn_worldmodels.benchmarks.common import (
    check_model_grid,
    format_number,
    markdown_table,
    torch_threads,
    write_csv,
)
from frmdn_worldmodels.benchmarks.datasets import (
    frame_sequences,
    list_wavs,
    read_audio,
    resample,
    timit_split,
)
from frmdn_worldmodels.benchmarks.runner import Task, train_grid
from frmdn_worldmodels.data.episodes import split_by_episode
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import Config, SpeechConfig
from frmdn_worldmodels.runtime.io import DataError, atomic_write_text, write_json
from frmdn_worldmodels.runtime.paths import prepare_stage, run_paths
from frmdn_worldmodels.runtime.progress import note, progress
from frmdn_worldmodels.runtime.rules import check_rules
from frmdn_worldmodels.runtime.seeds import seeded_rng

# The paper's Table 2 as printed: test NLL per sequence (nats, normalised units) on Blizzard, TIMIT, Accent.
PAPER_TABLE2: list[tuple[str, str, str, str]] = [
    ("RMDN (K=1) (Chung et al., 2015)", "-3539", "1900", "1293"),
    ("RMDN (K=20) (Chung et al., 2015)", "-7413", "-26643", "-3453"),
    ("VRNN (K=20) (Chung et al., 2015)", "≤ -9170", "≤ -28982", "≤ -4319"),
    ("RMDN (K=20)", "-4272", "-27674", "-3063"),
    ("FRMDN (K=20)", "-7961", "-32505", "-4319"),
]


@dataclass
class SpeechSplits:
    """Normalised frame sequences per split, and where they came from."""

    name: str
    """The corpus's name for the table (``TIMIT`` when its layout is found, else the folder's name)."""
    layout: str
    """``timit`` (its own train/test split) or ``random`` (90/5/5 by file)."""
    sequences: dict[str, list[np.ndarray]]
    """split -> float32 [T_i, frame] sequences in normalised units."""
    files: dict[str, int]
    """split -> number of wav files it came from."""
    mean: float
    """Global mean of the training samples (raw units, [-1, 1])."""
    std: float
    """Global std of the training samples."""
    notes: list[str] = field(default_factory=list)
    """What was changed on the way (resampling, channel mixing, skipped short files)."""


def _split_paths(paths: list[Path], root: Path, seed: int) -> tuple[str, dict[str, list[Path]]]:
    timit = timit_split(paths, root)
    if timit is not None:
        train, test = timit
        train, val = split_by_episode(train, (0.95,), seed)
        return "timit", {"train": train, "val": val, "test": test}
    if len(paths) < 3:
        raise DataError(
            f"{root}: found {len(paths)} wav file(s); a train/validation/test split needs at least 3"
        )
    train, val, test = split_by_episode(paths, (0.9, 0.05), seed)
    return "random", {"train": train, "val": val, "test": test}


def load_speech_corpus(config: SpeechConfig, seed: int) -> SpeechSplits:
    """Read, resample, frame, split and normalise the wav folder ``config.data``."""
    if not config.data:
        raise DataError(
            "the speech benchmark needs a folder of .wav files: pass --data PATH (or set speech.data)"
        )
    root = Path(config.data).expanduser()
    paths = list_wavs(root)
    if not paths:
        raise DataError(f"{root}: no .wav files found under this folder")
    if config.max_files and len(paths) > config.max_files:
        chosen = np.sort(np.random.default_rng(seed).choice(len(paths), config.max_files, replace=False))
        paths = [paths[i] for i in chosen]
    layout, split_paths = _split_paths(paths, root, seed)
    clip_frames = config.clip_frames
    rates, multichannel, too_short = Counter(), 0, 0
    raw: dict[str, list[np.ndarray]] = {}
    bar = progress(total=sum(map(len, split_paths.values())), desc="reading wavs", unit="file")
    for split, files in split_paths.items():
        raw[split] = []
        for path in files:
            samples, rate, channels = read_audio(path)
            multichannel += channels > 1
            if rate != config.sample_rate:
                rates[rate] += 1
                samples = resample(samples, rate, config.sample_rate)
            sequences = frame_sequences(samples.astype(np.float32), config.frame, clip_frames)
            too_short += not sequences
            raw[split] += sequences
            bar.update()
    bar.close()
    notes = [
        f"resampled {n} file(s) from {r} Hz to {config.sample_rate} Hz" for r, n in sorted(rates.items())
    ]
    if multichannel:
        notes.append(f"mixed {multichannel} multi-channel file(s) down to mono")
    if too_short:
        notes.append(f"skipped {too_short} file(s) shorter than one {'clip' if clip_frames else 'frame'}")
    for split in ("train", "val", "test"):
        if not raw[split]:
            raise DataError(
                f"{root}: no {split} sequences (every {split} file is shorter than one frame or clip)"
            )
    train = np.concatenate([s.ravel() for s in raw["train"]]).astype(np.float64)
    mean, std = float(train.mean()), float(train.std())
    if not std > 0:
        raise DataError(f"{root}: the training audio is constant (std 0); nothing to model")
    sequences = {k: [((s - mean) / std).astype(np.float32) for s in v] for k, v in raw.items()}
    name = "TIMIT" if layout == "timit" else root.name
    return SpeechSplits(
        name, layout, sequences, {k: len(v) for k, v in split_paths.items()}, mean, std, notes
    )


def pad_batch(sequences: list[np.ndarray], device) -> tuple[Tensor, Tensor]:
    """Sequences [T_i, F] -> (y [B, T+1, F] with a zero frame first and zeros after each end, mask [B, T])."""
    longest = max(len(s) for s in sequences)
    y = np.zeros((len(sequences), longest + 1, sequences[0].shape[1]), np.float32)
    mask = np.zeros((len(sequences), longest), bool)
    for i, s in enumerate(sequences):
        y[i, 1 : len(s) + 1] = s
        mask[i, : len(s)] = True
    return torch.from_numpy(y).to(device), torch.from_numpy(mask).to(device)


def length_batches(lengths: list[int], batch_size: int, generator: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar lengths (less padding): shuffle, sort within windows of 20 batches, and
    shuffle the batches."""
    order = generator.permutation(len(lengths))
    window = batch_size * 20
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in generator.permutation(len(batches))]


def sequence_nll(model: MemoryModel, sequences: list[np.ndarray], batch_size: int, device) -> np.ndarray:
    """-log p(sequence) = -sum over frames of log p(frame_t | frames_<t), for each sequence: [N]."""
    out = np.zeros(len(sequences))
    lengths = [len(s) for s in sequences]
    order = np.argsort(lengths, kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            y, mask = pad_batch([sequences[i] for i in index], device)
            log_prob, _ = model.sequence_log_prob(y)
            out[index] = -(log_prob * mask).sum(1).double().cpu().numpy()
    return out


def speech_label(kind: str, components: int, rank: int) -> str:
    """Row name in Table 2's style: ``FRMDN (K=20)``, or with the rank when it is not diagonal."""
    return f"{kind.upper()} (K={components}" + (f", d'={rank})" if rank else ")")


def check_speech_config(cfg: Config) -> None:
    """Every speech setting, before any file is read or written (``ConfigError`` naming the field)."""
    check_model_grid(cfg.speech, "speech")
    check_rules(cfg, "speech")


def run(cfg: Config) -> dict:
    """Train and score RMDN and FRMDN on the wav folder; outputs go to ``<run>/benchmarks/speech``."""
    with torch_threads(cfg.speech.threads):
        return _run(cfg)


def _eval_subset(sequences: list[np.ndarray], limit: int, seed: int) -> list[np.ndarray]:
    """At most ``limit`` of the sequences (a seeded random subset, in their order; 0 = all)."""
    if limit and len(sequences) > limit:
        chosen = np.random.default_rng(seed + 1).choice(len(sequences), limit, replace=False)
        sequences = [sequences[i] for i in np.sort(chosen)]
    return sequences


def _data_fingerprint(cfg: Config, corpus: SpeechSplits) -> dict:
    """What the data of every model depends on: the folder, the split, framing, subsets and normalisation."""
    config = cfg.speech
    return {
        "data": config.data,
        "layout": corpus.layout,
        "files": corpus.files,
        "frame": config.frame,
        "sample_rate": config.sample_rate,
        "clip_seconds": config.clip_seconds,
        "seed": cfg.seed,
        "max_files": config.max_files,
        "max_eval_sequences": config.max_eval_sequences,
        "mean": corpus.mean,
        "std": corpus.std,
    }


def speech_task(cfg: Config, train: list[np.ndarray], evals: dict[str, list[np.ndarray]], device) -> Task:
    r"""The speech data set's part of the run: batches of similar lengths, the NLL of a sequence
    :math:`-\sum_t \log p(x_t \mid x_{<t})` averaged over the validation set, and on the test set per
    sequence (± 2 standard errors) and per sample (the total over the test set / its samples)."""
    config = cfg.speech
    lengths = [len(s) for s in train]
    test = evals["test"]
    test_samples = sum(s.size for s in test)

    def epoch_batches(epoch: int):
        generator = seeded_rng(cfg.seed, None, epoch)
        for index in length_batches(lengths, config.batch_size, generator):
            yield pad_batch([train[i] for i in index], device)

    def batch_loss(model: MemoryModel, batch) -> tuple[Tensor, int]:
        y, mask = batch
        return model.sequence_loss(y, mask=mask)["loss"], int(mask.sum())

    def validate(model: MemoryModel) -> float:
        return float(sequence_nll(model, evals["val"], config.batch_size, device).mean())

    def test_metrics(model: MemoryModel) -> dict:
        nll = sequence_nll(model, test, config.batch_size, device)
        two_se = float(2 * nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else None
        return {
            "nll_per_sequence": float(nll.mean()),
            "nll_per_sequence_2se": two_se,
            "nll_per_sample": float(nll.sum() / test_samples),
        }

    return Task(
        build=lambda memory: MemoryModel(config.frame, 0, memory).to(device),
        epoch_batches=epoch_batches,
        batches_per_epoch=len(length_batches(lengths, config.batch_size, np.random.default_rng(0))),
        batch_loss=batch_loss,
        validate=validate,
        test_metrics=test_metrics,
        label=lambda memory: speech_label(memory.kind, memory.components, memory.rank),
        val_key="val_nll_per_sequence",
        curve_label="validation NLL per sequence (nats, normalised units)",
    )


def _run(cfg: Config) -> dict:
    config = cfg.speech
    check_speech_config(cfg)
    corpus = load_speech_corpus(config, cfg.seed)
    for message in corpus.notes:
        note("note: " + message)
    device = torch.device(cfg.device)
    out_dir = prepare_stage(cfg, run_paths(cfg).benchmarks / "speech")
    train = corpus.sequences["train"]
    evals = {
        split: _eval_subset(corpus.sequences[split], config.max_eval_sequences, cfg.seed)
        for split in ("val", "test")
    }
    test = evals["test"]
    test_samples = sum(s.size for s in test)
    note(
        f"speech benchmark on {corpus.name} ({corpus.layout} split): {len(train)} train / "
        f"{len(evals['val'])} val / {len(test)} test sequences of {config.frame}-sample frames; "
        f"mean {corpus.mean:.4g}, std {corpus.std:.4g}"
    )
    task = speech_task(cfg, train, evals, device)
    rows = [run.result for run in train_grid(cfg, config, out_dir, _data_fingerprint(cfg, corpus), task)]
    _write_tables(out_dir, corpus, rows, len(test), test_samples)
    summary = {
        "corpus": corpus.name,
        "layout": corpus.layout,
        "files": corpus.files,
        "sequences": {"train": len(train), "val": len(evals["val"]), "test": len(test)},
        "test_samples": test_samples,
        "normalisation": {"mean": corpus.mean, "std": corpus.std},
        "units": "nats, normalised units (waveform divided by the training std)",
        "notes": corpus.notes,
        "results": rows,
        "results_md": str(out_dir / "results.md"),
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def _write_tables(
    out_dir: Path, corpus: SpeechSplits, rows: list[dict], sequences: int, samples: int
) -> None:
    headers = [
        "Model",
        "paper: Blizzard",
        "paper: TIMIT",
        "paper: Accent",
        f"ours: {corpus.name} NLL/sequence",
        f"ours: {corpus.name} NLL/sample",
    ]
    ours = {row["model"]: row for row in rows}
    names = [row[0] for row in PAPER_TABLE2] + [
        row["model"] for row in rows if row["model"] not in {p[0] for p in PAPER_TABLE2}
    ]
    table = []
    for name in names:
        paper = next((p for p in PAPER_TABLE2 if p[0] == name), None)
        mine = ours.get(name)
        table.append(
            [
                name,
                *(paper[1:] if paper else ("—", "—", "—")),
                (
                    f"{mine['nll_per_sequence']:.1f}"
                    + (
                        f" ± {mine['nll_per_sequence_2se']:.1f}"
                        if mine["nll_per_sequence_2se"] is not None
                        else ""
                    )
                )
                if mine
                else "—",
                format_number(mine["nll_per_sample"], 4) if mine else "—",
            ]
        )
    csv_rows = [["ours", r["model"], corpus.name, r["nll_per_sequence"], r["nll_per_sample"]] for r in rows]
    for paper in PAPER_TABLE2:
        for column, dataset in ((1, "Blizzard"), (2, "TIMIT"), (3, "Accent")):
            csv_rows.append(
                ["paper", paper[0], dataset, paper[column].replace("≤", "<=").replace(" ", ""), ""]
            )
    write_csv(
        out_dir / "results.csv",
        ["source", "model", "dataset", "nll_per_sequence", "nll_per_sample"],
        csv_rows,
    )
    text = [
        f"# Speech NLL benchmark (paper Table 2) on {corpus.name}\n",
        (
            "Test NLL in nats in **normalised units** (the waveform minus the training mean "
            f"{corpus.mean:.4g}, divided by the training std {corpus.std:.4g}), as VRNN and the paper "
            "report it: per sequence = the sum over its frames of -log p(frame | previous frames), "
            f"averaged over {sequences} test sequences (± 2 standard errors); "
            f"per sample = the total over the test set / its {samples} samples. "
            f"Split: {'TIMIT' if corpus.layout == 'timit' else 'random 90/5/5 by file'} "
            f"({corpus.files['train']} / {corpus.files['val']} / {corpus.files['test']} files). "
            "The paper's columns are copied from its Table 2; they compare with ours only on the same "
            "corpus, split, clip length and normalisation.\n"
        ),
        markdown_table(headers, table),
    ]
    if corpus.notes:
        text.append("Notes: " + "; ".join(corpus.notes) + ".\n")
    atomic_write_text(out_dir / "results.md", "\n".join(text))
