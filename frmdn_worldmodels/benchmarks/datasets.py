"""Readers for the benchmark corpora: MNIST (IDX), CIFAR-10 (python batches), 8x8 digits, and folders of wavs.

Every reader validates what it reads and raises :class:`~runtime.io.DataError` naming the file (or folder)
and what is wrong with it, so ``run.py`` can print one clear line and exit with status 2.

Images come back as uint8 arrays ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (colour) with int64 labels, plus the
number of intensity levels (256 for MNIST and CIFAR-10, 17 for the 8x8 digits whose pixels are 0..16).
Audio comes back as float64 mono waveforms in [-1, 1] and their sample rate.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import re
import typing
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from frmdn_worldmodels.runtime.config import ConfigError, ImageDataset
from frmdn_worldmodels.runtime.io import DataError

# ----------------------------------------------------------------------------------------------------- images


@dataclass
class ImageSplits:
    """An image data set cut into train / validation / test, with what the NLL protocol needs to know."""

    name: str
    """``digits``, ``mnist`` or ``cifar10``."""
    images: dict[str, np.ndarray]
    """split -> uint8 [N, H, W] or [N, H, W, 3]."""
    labels: dict[str, np.ndarray]
    """split -> int64 [N] in 0..classes-1."""
    levels: int
    """Number of intensity levels of a pixel (pixels are 0..levels-1)."""
    classes: int
    """Number of labels C."""


# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed): 2 zero bytes, a type code, the number of dimensions, the
    dimensions as big-endian int32, then the data. Truncated or malformed files raise DataError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: unreadable or truncated gzip file ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header} for {ndim} dims)")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataError(f"{path}: IDX file {what}: shape {shape} needs {expected} data bytes, found {found}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_one(folder: Path, prefixes: tuple[str, ...], marker: str, what: str) -> Path:
    """The file under ``folder`` whose name starts with one of ``prefixes`` and contains ``marker``
    (MNIST names vary: ``train-images-idx3-ubyte``, ``train-images.idx3-ubyte``, with or without ``.gz``)."""
    hits = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name.lower().startswith(prefixes) and marker in p.name.lower()
    )
    if not hits:
        raise DataError(
            f"{folder}: no MNIST {what} file found (expected e.g. {prefixes[0]}-{marker}-ubyte or its .gz)"
        )
    raw = [p for p in hits if not p.name.endswith(".gz")]
    return (raw or hits)[0]


def _check_mnist_pair(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{image_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{label_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{label_path}: label {int(labels.max())} out of range 0..9")


def load_mnist(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST's four IDX files under ``folder`` -> {"train": (images, labels), "test": (images, labels)}."""
    folder = _existing_folder(folder, "MNIST")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        image_path = _find_one(folder, (f"{prefix}-images", f"{prefix}_images"), "idx3", f"{split} images")
        label_path = _find_one(folder, (f"{prefix}-labels", f"{prefix}_labels"), "idx1", f"{split} labels")
        images, labels = read_idx(image_path), read_idx(label_path)
        _check_mnist_pair(images, labels, image_path, label_path)
        out[split] = (images, labels.astype(np.int64))
    return out


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR-10 batch needs nothing else, and refusing
    every other global means a file that is not a CIFAR-10 batch cannot run code when it is read."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            if module.startswith(
                "numpy.core."
            ):  # the original batches predate numpy 2's rename to numpy._core
                module = "numpy._core." + module.removeprefix("numpy.core.")
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR-10 batch holds only arrays)")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 images [N, 32, 32, 3], int64 labels [N]).

    The batch is a pickled dict with ``b"data"`` (uint8 [N, 3072]: the red, green and blue 32x32 planes) and
    ``b"labels"`` (N ints in 0..9)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            batch = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        OSError,
    ) as error:  # what a broken, truncated or foreign file raises
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise DataError(
            f"{path}: not a CIFAR-10 python batch (top level is {type(batch).__name__}, not dict)"
        )
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels' (keys: {sorted(map(str, batch))})")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072], got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' must be a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels out of range 0..9 (min {labels.min()}, max {labels.max()})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar10(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10's ``data_batch_1..5`` and ``test_batch`` under ``folder`` (e.g. ``cifar-10-batches-py/``)."""
    folder = _existing_folder(folder, "CIFAR-10")
    train_paths = sorted(p for p in folder.rglob("data_batch_*") if p.is_file())
    test_paths = sorted(p for p in folder.rglob("test_batch") if p.is_file())
    if not train_paths or not test_paths:
        raise DataError(
            f"{folder}: no CIFAR-10 python batches found (expected data_batch_1..data_batch_5 "
            "and test_batch, as in cifar-10-python.tar.gz)"
        )
    out = {}
    for split, paths in (("train", train_paths), ("test", test_paths[:1])):
        parts = [read_cifar_batch(p) for p in paths]
        out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (shipped with the package): uint8 images [1797, 8, 8] in 0..16, labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def _take(pair: tuple[np.ndarray, np.ndarray], index) -> tuple[np.ndarray, np.ndarray]:
    return pair[0][index], pair[1][index]


IMAGE_DATASETS = typing.get_args(ImageDataset)
"""The values of ``image.dataset``."""
_DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
_MNIST_PREFIXES = tuple(
    f"{split}{sep}{what}" for split in ("train", "t10k") for sep in "-_" for what in ("images", "labels")
)
_CIFAR_BATCH = re.compile(r"(data_batch_\d+|test_batch)")
EXPECTED_IMAGE_FILES = (
    "MNIST's IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
    "t10k-labels-idx1-ubyte (raw or .gz), or CIFAR-10's python batches data_batch_1 .. data_batch_5 and "
    "test_batch (as in cifar-10-batches-py/)"
)


def image_datasets_in(folder: str | Path) -> list[str]:
    """Which image data sets the files under ``folder`` (searched recursively, as the readers do) belong to:
    ``mnist`` when an MNIST IDX file name is found, ``cifar10`` when a CIFAR-10 batch name is; possibly both
    or neither. A missing folder raises DataError."""
    folder = _existing_folder(folder, "image")
    found = set()
    for path in folder.rglob("*"):
        name = path.name.lower()
        if name.startswith(_MNIST_PREFIXES) and "idx" in name and path.is_file():
            found.add("mnist")
        elif _CIFAR_BATCH.fullmatch(path.name) and path.is_file():
            found.add("cifar10")
        if len(found) == 2:
            break
    return sorted(found, key=list(_DATASET_NAMES).index)


def _listing(folder: Path, shown: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return "it holds " + ", ".join(names[:shown]) + more


def resolve_image_dataset(dataset: str, data: str | None) -> str:
    """The data set ``image.dataset`` and ``image.data`` (``--data``) name: ``digits``, ``mnist`` or
    ``cifar10``.

    - ``auto``: the 8x8 digits without a folder; with one, MNIST or CIFAR-10 as its files say (neither, or
      both: refused, naming the folder and the files expected);
    - ``digits`` with a folder: refused (the digits ship with scikit-learn, the folder would be ignored);
    - ``mnist`` or ``cifar10``: needs a folder, and one holding only the other data set's files is refused.
    """
    if dataset not in IMAGE_DATASETS:
        raise ConfigError(f"image.dataset must be one of {', '.join(IMAGE_DATASETS)}, got {dataset!r}")
    if dataset == "digits":
        if data:
            raise ConfigError(
                f"image.dataset=digits takes no data folder (the 8x8 digits ship with scikit-learn), but "
                f"image.data (--data) is {data}: set image.dataset=auto, mnist or cifar10 to benchmark that "
                "folder, or drop --data"
            )
        return "digits"
    if not data:
        if dataset == "auto":
            return "digits"
        raise DataError(
            f"the {dataset} benchmark needs the data folder: pass --data PATH (or set image.data)"
        )
    found = image_datasets_in(data)
    folder = Path(data).expanduser()
    if dataset == "auto":
        if len(found) == 1:
            return found[0]
        if found:
            raise DataError(
                f"{folder}: holds both MNIST and CIFAR-10 files; set image.dataset=mnist or "
                "image.dataset=cifar10"
            )
        raise DataError(
            f"{folder}: neither MNIST nor CIFAR-10 files found "
            f"(image.dataset=auto expected {EXPECTED_IMAGE_FILES}); "
            f"{_listing(folder)}"
        )
    if found and dataset not in found:
        (other,) = found
        raise DataError(
            f"{folder}: holds {_DATASET_NAMES[other]} files, not {_DATASET_NAMES[dataset]} ones, "
            f"but image.dataset is {dataset}: set image.dataset={other} (or auto)"
        )
    return dataset


def load_image_splits(dataset: str, data: str | None, seed: int) -> ImageSplits:
    """The data set (``dataset`` and ``data`` resolved by :func:`resolve_image_dataset`) cut as the MAF
    protocol does.

    - ``mnist``: the last 1/6 of the training file (10k of 60k) is the validation set; test = ``t10k``.
    - ``cifar10``: the last 1/10 of the training batches (5k of 50k) is the validation set; test = test_batch.
    - ``digits``: a seeded 80/10/10 split of the 1797 images.
    """
    dataset = resolve_image_dataset(dataset, data)
    if dataset == "digits":
        images, labels = load_digits()
        order = np.random.default_rng(seed).permutation(len(images))
        n_val = n_test = round(0.1 * len(images))
        parts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        return ImageSplits(
            "digits",
            {k: images[v] for k, v in parts.items()},
            {k: labels[v] for k, v in parts.items()},
            levels=17,
            classes=10,
        )
    loaded = load_mnist(data) if dataset == "mnist" else load_cifar10(data)
    train_images, _ = loaded["train"]
    n_val = len(train_images) // (6 if dataset == "mnist" else 10)
    if n_val == 0 or len(loaded["test"][0]) == 0:
        raise DataError(f"{data}: too few {dataset} images to split off a validation and a test set")
    train = _take(loaded["train"], slice(0, len(train_images) - n_val))
    val = _take(loaded["train"], slice(len(train_images) - n_val, None))
    test = loaded["test"]
    return ImageSplits(
        dataset,
        {"train": train[0], "val": val[0], "test": test[0]},
        {"train": train[1], "val": val[1], "test": test[1]},
        levels=256,
        classes=10,
    )


# ------------------------------------------------------------------------------------------------------ audio


def _existing_folder(folder: str | Path, what: str) -> Path:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"{folder}: the {what} data folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: expected the {what} data folder, found a file")
    return folder


def list_wavs(folder: str | Path) -> list[Path]:
    """Every ``.wav`` under ``folder`` (any case: TIMIT ships ``.WAV``), sorted.

    Some TIMIT copies hold both the original ``X.WAV`` (NIST SPHERE) and a converted ``X.WAV.wav``; only the
    converted one is kept, so no utterance is read twice."""
    folder = _existing_folder(folder, "speech")
    paths = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() == ".wav" and p.is_file() and not p.name.startswith(".")
    )
    converted = {p.with_name(p.name[: -len(".wav")]) for p in paths if p.name.lower().endswith(".wav.wav")}
    return [p for p in paths if p not in converted]


def _pcm_to_float(frames: bytes, width: int, channels: int, path: Path) -> np.ndarray:
    """Interleaved little-endian integer PCM -> float64 [n, channels] in [-1, 1]."""
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(frames, dtype="<i2") / 32768.0
    elif width == 3:
        raw = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        samples = np.where(value >= 1 << 23, value - (1 << 24), value) / float(1 << 23)
    elif width == 4:
        samples = np.frombuffer(frames, dtype="<i4") / 2147483648.0
    else:
        raise DataError(
            f"{path}: unsupported sample width of {width} bytes ({8 * width}-bit); "
            "supported: 8-, 16-, 24- and 32-bit integer PCM"
        )
    usable = len(samples) - len(samples) % channels
    return samples[:usable].reshape(-1, channels)


def _read_riff(path: Path) -> tuple[np.ndarray, int]:
    try:
        with wave.open(str(path), "rb") as handle:
            channels, width, rate = handle.getnchannels(), handle.getsampwidth(), handle.getframerate()
            declared = handle.getnframes()
            frames = handle.readframes(declared)
    except (wave.Error, EOFError, ValueError) as error:
        hint = " (format 3 is floating point: convert to integer PCM, e.g. sox in.wav -b 16 out.wav)"
        raise DataError(
            f"{path}: not a readable integer-PCM wav file ({error})"
            f"{hint if 'format: 3' in str(error) else ''}"
        ) from None
    if width not in (1, 2, 3, 4):
        raise DataError(
            f"{path}: unsupported sample width of {width} bytes ({8 * width}-bit); "
            "supported: 8-, 16-, 24- and 32-bit integer PCM"
        )
    if len(frames) < declared * width * channels:
        raise DataError(
            f"{path}: truncated wav data ({len(frames)} bytes, "
            f"the header declares {declared * width * channels})"
        )
    return _pcm_to_float(frames, width, channels, path), rate


def _read_sphere(path: Path, raw: bytes) -> tuple[np.ndarray, int]:
    """NIST SPHERE (TIMIT's original ``.WAV``): a text header ``NIST_1A\\n<size>\\n`` of ``name -type value``
    lines up to ``end_head``, then uncompressed PCM samples."""
    try:
        size = int(raw[8:16].split()[0])
        fields = {}
        for line in raw[16:size].decode("ascii", "replace").splitlines():
            parts = line.split(None, 2)
            if parts and parts[0] == "end_head":
                break
            if len(parts) == 3:
                fields[parts[0]] = parts[2].strip()
        rate = int(fields.get("sample_rate", 16000))
        width = int(fields.get("sample_n_bytes", 2))
        channels = int(fields.get("channel_count", 1))
    except (ValueError, IndexError):
        raise DataError(f"{path}: unreadable NIST SPHERE header") from None
    coding = fields.get("sample_coding", "pcm")
    if coding.split(",")[0] != "pcm" or "shorten" in coding:
        raise DataError(
            f"{path}: NIST SPHERE with sample_coding {coding!r} is not supported; convert it to PCM wav"
        )
    data = raw[size:]
    if width > 1 and fields.get("sample_byte_format", "01") == "10":  # big-endian samples
        data = (
            np.frombuffer(data[: len(data) - len(data) % width], dtype=f">i{width}")
            .astype(f"<i{width}")
            .tobytes()
        )
    return _pcm_to_float(data, width, channels, path), rate


def read_audio(path: str | Path) -> tuple[np.ndarray, int, int]:
    """A RIFF wav (8/16/24/32-bit integer PCM) or NIST SPHERE file -> (float64 mono samples in [-1, 1], sample
    rate, number of channels in the file); several channels are averaged into one."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if head.startswith(b"NIST_1A"):
        samples, rate = _read_sphere(path, path.read_bytes())
    else:
        samples, rate = _read_riff(path)
    if rate <= 0:
        raise DataError(f"{path}: bad sample rate {rate}")
    return samples.mean(axis=1), rate, samples.shape[1]


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling from ``rate`` to ``target`` Hz (scipy.signal.resample_poly)."""
    if rate == target:
        return samples
    from scipy.signal import resample_poly

    common = math.gcd(rate, target)
    return resample_poly(samples, target // common, rate // common)


_TIMIT_DIALECT = re.compile(r"dr[1-8]", re.IGNORECASE)


def timit_split(paths: list[Path], root: Path) -> tuple[list[Path], list[Path]] | None:
    """TIMIT's own split when the layout ``.../TRAIN/DR<n>/<speaker>/*.WAV`` and ``.../TEST/DR<n>/...`` is
    found (any case); None otherwise."""
    train, test = [], []
    for path in paths:
        parts = [p.lower() for p in path.relative_to(root).parts]
        for i, part in enumerate(parts[:-2]):
            if part in ("train", "test") and _TIMIT_DIALECT.fullmatch(parts[i + 1]):
                (train if part == "train" else test).append(path)
                break
    if train and test:
        return train, test
    return None


def frame_sequences(samples: np.ndarray, frame: int, clip_frames: int = 0) -> list[np.ndarray]:
    """Cut a waveform into frames of ``frame`` samples (the last partial frame is dropped).

    With ``clip_frames`` > 0 the frames are further cut into consecutive clips of exactly that many frames
    (the shorter remainder is dropped), as VRNN and the paper did for Accent and Blizzard (0.5 s)."""
    count = len(samples) // frame
    frames = samples[: count * frame].reshape(count, frame)
    if clip_frames <= 0:
        return [frames] if count else []
    return [frames[i : i + clip_frames] for i in range(0, count - clip_frames + 1, clip_frames)]


def encode_wav_bytes(samples: np.ndarray, rate: int, width: int = 2) -> bytes:
    """Integer-PCM mono wav bytes of ``samples`` in [-1, 1] (used by the tests and the examples)."""
    clipped = np.clip(np.asarray(samples, dtype=np.float64), -1.0, 1.0 - 1.0 / (1 << (8 * width - 1)))
    if width == 1:
        data = np.round(clipped * 128 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        ints = np.round(clipped * (1 << 23)).astype(np.int32)
        data = (
            np.stack([ints & 0xFF, (ints >> 8) & 0xFF, (ints >> 16) & 0xFF], axis=1)
            .astype(np.uint8)
            .tobytes()
        )
    else:
        data = np.round(clipped * (1 << (8 * width - 1))).astype(f"<i{width}").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(width)
        handle.setframerate(rate)
        handle.writeframes(data)
    return buffer.getvalue()
