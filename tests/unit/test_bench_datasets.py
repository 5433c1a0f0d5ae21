"""The benchmark readers on small files written here in the exact on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import wave

import numpy as np
import pytest

from frmdn_worldmodels.benchmarks.datasets import (
    encode_wav_bytes,
    frame_sequences,
    list_wavs,
    load_cifar10,
    load_image_splits,
    load_mnist,
    read_audio,
    read_cifar_batch,
    read_idx,
    resample,
    resolve_image_dataset,
    timit_split,
)
from frmdn_worldmodels.runtime.config import ConfigError
from frmdn_worldmodels.runtime.io import DataError

# ------------------------------------------------------------------------------------------------ MNIST IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: 0, 0, type code, ndim, big-endian int32 dims, big-endian data."""
    code = {np.uint8: 0x08, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist(folder, rng, n_train=12, n_test=5, compress=False, side=28, dotted=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for stem, array in arrays.items():
        kind = "idx3" if array.ndim == 3 else "idx1"
        name = f"{stem}.{kind}-ubyte" if dotted else f"{stem}-{kind}-ubyte"
        data = idx_bytes(array)
        if compress:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_roundtrip(tmp_path, compress):
    arrays = write_mnist(tmp_path / "mnist", np.random.default_rng(0), compress=compress)
    loaded = load_mnist(tmp_path / "mnist")
    np.testing.assert_array_equal(loaded["train"][0], arrays["train-images"])
    np.testing.assert_array_equal(loaded["train"][1], arrays["train-labels"])
    np.testing.assert_array_equal(loaded["test"][0], arrays["t10k-images"])
    np.testing.assert_array_equal(loaded["test"][1], arrays["t10k-labels"])
    assert loaded["train"][1].dtype == np.int64


def test_mnist_kaggle_names_in_subfolder(tmp_path):
    arrays = write_mnist(tmp_path / "data" / "MNIST" / "raw", np.random.default_rng(1), dotted=True)
    loaded = load_mnist(tmp_path / "data")
    np.testing.assert_array_equal(loaded["test"][0], arrays["t10k-images"])


def test_idx_other_dtypes_are_read_big_endian(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000
    (tmp_path / "x.idx").write_bytes(idx_bytes(values))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), values)


@pytest.mark.parametrize("cut", [3, 10, 100])
def test_truncated_idx_names_the_file(tmp_path, cut):
    data = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data[:-cut] if cut != 10 else data[:10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*(truncated|magic)"):
        read_idx(path)


def test_truncated_gzip_idx(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:-20])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        read_idx(path)


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


def test_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(2))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="5 images but .*4 labels"):
        load_mnist(tmp_path)


def test_mnist_missing_files_and_folder(tmp_path):
    with pytest.raises(DataError, match="no MNIST train images"):
        load_mnist(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")


def test_mnist_splits_hold_out_a_sixth_for_validation(tmp_path):
    arrays = write_mnist(tmp_path, np.random.default_rng(3), n_train=12)
    splits = load_image_splits("mnist", str(tmp_path), seed=0)
    assert [len(splits.images[s]) for s in ("train", "val", "test")] == [10, 2, 5]
    np.testing.assert_array_equal(splits.images["val"], arrays["train-images"][10:])
    assert splits.levels == 256 and splits.classes == 10


# ----------------------------------------------------------------------------------------- CIFAR-10 batches


def write_cifar(folder, rng, sizes=(4, 3), n_test=2):
    """data_batch_i and test_batch as the original: pickled dicts with bytes keys, protocol 2."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    names = [f"data_batch_{i + 1}" for i in range(len(sizes))] + ["test_batch"]
    for name, n in zip(names, [*sizes, n_test], strict=True):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        batches[name] = batch
    return batches


def test_cifar_batches_roundtrip(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    loaded = load_cifar10(tmp_path)
    images, labels = loaded["train"]
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
    first = batches["data_batch_1"][b"data"]
    # Plane layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    row, col = 5, 17
    assert images[0, row, col, 0] == first[0, row * 32 + col]
    assert images[0, row, col, 1] == first[0, 1024 + row * 32 + col]
    assert images[0, row, col, 2] == first[0, 2048 + row * 32 + col]
    np.testing.assert_array_equal(labels[:4], batches["data_batch_1"][b"labels"])
    np.testing.assert_array_equal(loaded["test"][1], batches["test_batch"][b"labels"])


def test_cifar_batch_written_with_numpy_1_names(tmp_path):
    """The original batches name numpy.core.multiarray._reconstruct (numpy 2 calls it numpy._core)."""
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=2)
    assert b"numpy._core.multiarray" in raw
    path = tmp_path / "test_batch"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    images, labels = read_cifar_batch(path)
    assert images[1, 0, 1, 0] == data[1, 1] and list(labels) == [3, 4]


def test_cifar_refuses_code_in_a_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="data_batch_1.*refusing"):
        read_cifar_batch(path)
    assert not marker.exists()


def test_cifar_bad_shapes_and_truncation(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: 'data' must be uint8 \[N, 3072\]"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="2 images but labels"):
        read_cifar_batch(path)
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        read_cifar_batch(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no CIFAR-10 python batches"):
        load_cifar10(tmp_path / "empty")


def test_digits_split_is_seeded_and_complete():
    a = load_image_splits("digits", None, seed=3)
    b = load_image_splits("digits", None, seed=3)
    assert sum(len(v) for v in a.labels.values()) == 1797
    assert a.levels == 17 and a.images["train"].max() == 16
    np.testing.assert_array_equal(a.images["test"], b.images["test"])


def test_auto_dataset_is_inferred_from_the_folder(tmp_path):
    rng = np.random.default_rng(5)
    assert resolve_image_dataset("auto", None) == "digits"
    write_mnist(tmp_path / "mnist", rng, compress=True)
    write_mnist(tmp_path / "kaggle" / "MNIST" / "raw", rng, dotted=True)
    write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", rng, sizes=(6, 6))
    assert resolve_image_dataset("auto", str(tmp_path / "mnist")) == "mnist"
    assert resolve_image_dataset("auto", str(tmp_path / "kaggle")) == "mnist"
    assert resolve_image_dataset("auto", str(tmp_path / "cifar")) == "cifar10"
    assert resolve_image_dataset("mnist", str(tmp_path / "mnist")) == "mnist"
    assert resolve_image_dataset("cifar10", str(tmp_path / "cifar")) == "cifar10"
    splits = load_image_splits("auto", str(tmp_path / "cifar"), seed=0)
    assert splits.name == "cifar10" and splits.images["test"].shape == (2, 32, 32, 3)


def test_image_folders_that_are_refused(tmp_path):
    rng = np.random.default_rng(6)
    with pytest.raises(DataError, match="nowhere: the image data folder does not exist"):
        resolve_image_dataset("auto", str(tmp_path / "nowhere"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"")
    with pytest.raises(
        DataError,
        match=r"photos: neither MNIST nor CIFAR-10 .*train-images-idx3-ubyte.*data_batch_1"
        r".*test_batch.*it holds cat.png",
    ):
        resolve_image_dataset("auto", str(tmp_path / "photos"))
    write_cifar(tmp_path / "cifar", rng)
    with pytest.raises(DataError, match="cifar: holds CIFAR-10 files, not MNIST ones.*image.dataset=cifar10"):
        resolve_image_dataset("mnist", str(tmp_path / "cifar"))
    write_mnist(tmp_path / "mnist", rng)
    with pytest.raises(DataError, match="mnist: holds MNIST files, not CIFAR-10 ones.*image.dataset=mnist"):
        resolve_image_dataset("cifar10", str(tmp_path / "mnist"))
    write_mnist(tmp_path / "cifar", rng)
    with pytest.raises(DataError, match="cifar: holds both MNIST and CIFAR-10 files"):
        resolve_image_dataset("auto", str(tmp_path / "cifar"))
    with pytest.raises(ConfigError, match="image.dataset=digits takes no data folder"):
        resolve_image_dataset("digits", str(tmp_path / "mnist"))
    with pytest.raises(ConfigError, match="image.dataset must be one of auto, digits, mnist, cifar10"):
        resolve_image_dataset("svhn", None)
    with pytest.raises(DataError, match="--data PATH"):
        resolve_image_dataset("cifar10", None)


# -------------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_sample_widths_roundtrip(tmp_path, width):
    t = np.arange(800) / 16000
    signal = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / f"w{width}.wav"
    path.write_bytes(encode_wav_bytes(signal, 16000, width))
    samples, rate, channels = read_audio(path)
    assert rate == 16000 and channels == 1 and samples.shape == (800,)
    np.testing.assert_allclose(samples, signal, atol=1.5 / 2 ** (8 * width - 1))


def test_stereo_is_averaged(tmp_path):
    left = np.full(100, 1000, np.int16)
    right = np.full(100, -3000, np.int16)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(8000)
        handle.writeframes(np.stack([left, right], 1).tobytes())
    samples, rate, channels = read_audio(path)
    assert channels == 2 and rate == 8000
    np.testing.assert_allclose(samples, -1000 / 32768)


def riff_bytes(format_tag: int, bits: int, frames: int = 50) -> bytes:
    """A wav header written by hand, for formats the wave module refuses to write."""
    width = (bits + 7) // 8
    fmt = struct.pack("<HHIIHH", format_tag, 1, 16000, 16000 * width, width, bits)
    data = bytes(frames * width)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_wav_with_wrong_sample_width_names_file_and_width(tmp_path):
    path = tmp_path / "deep.wav"
    path.write_bytes(riff_bytes(1, 64))
    with pytest.raises(DataError, match=r"deep.wav: unsupported sample width of 8 bytes \(64-bit\)"):
        read_audio(path)
    path = tmp_path / "float.wav"
    path.write_bytes(riff_bytes(3, 32))
    with pytest.raises(DataError, match="float.wav: not a readable integer-PCM wav.*floating point"):
        read_audio(path)


def test_truncated_wav(tmp_path):
    path = tmp_path / "cut.wav"
    path.write_bytes(encode_wav_bytes(np.zeros(1000), 16000)[:-300])
    with pytest.raises(DataError, match="cut.wav: truncated"):
        read_audio(path)


def test_nist_sphere(tmp_path):
    samples = (np.arange(-50, 50) * 300).astype("<i2")
    header = "NIST_1A\n   1024\nsample_rate -i 16000\nsample_n_bytes -i 2\nchannel_count -i 1\n"
    header += "sample_byte_format -s2 01\nsample_coding -s3 pcm\nend_head\n"
    path = tmp_path / "SA1.WAV"
    path.write_bytes(header.encode().ljust(1024, b" ") + samples.tobytes())
    audio, rate, channels = read_audio(path)
    assert rate == 16000 and channels == 1
    np.testing.assert_allclose(audio, samples / 32768.0)
    shorten = header.replace("pcm", "pcm,embedded-shorten-v2.00")
    path.write_bytes(shorten.encode().ljust(1024, b" ") + samples.tobytes())
    with pytest.raises(DataError, match="SA1.WAV: NIST SPHERE .*shorten"):
        read_audio(path)


def test_list_wavs_any_case_without_duplicates(tmp_path):
    wav = encode_wav_bytes(np.zeros(10), 16000)
    for name in ("a.wav", "B.WAV", "c.WAV", "c.WAV.wav", "notes.txt", ".hidden.wav"):
        (tmp_path / name).write_bytes(wav)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.Wav").write_bytes(wav)
    assert [p.name for p in list_wavs(tmp_path)] == ["B.WAV", "a.wav", "c.WAV.wav", "d.Wav"]


def test_timit_layout_detection(tmp_path):
    paths = [
        tmp_path / "TIMIT" / "TRAIN" / "DR1" / "FCJF0" / "SA1.WAV",
        tmp_path / "TIMIT" / "TRAIN" / "DR2" / "MABC0" / "SX3.WAV",
        tmp_path / "TIMIT" / "TEST" / "DR1" / "FAKS0" / "SA1.WAV",
    ]
    train, test = timit_split(paths, tmp_path)
    assert train == paths[:2] and test == paths[2:]
    assert timit_split([tmp_path / "x" / "train" / "a.wav", tmp_path / "test" / "b.wav"], tmp_path) is None


def test_frames_and_clips():
    samples = np.arange(1050, dtype=np.float32)
    (whole,) = frame_sequences(samples, 200)
    assert whole.shape == (5, 200) and whole[1, 0] == 200
    clips = frame_sequences(samples, 100, clip_frames=4)  # 10 frames -> two clips of 4, remainder dropped
    assert [c.shape for c in clips] == [(4, 100), (4, 100)]
    assert clips[1][0, 0] == 400
    assert frame_sequences(samples[:150], 200) == []


def test_resample_keeps_the_frequency():
    t = np.arange(8000) / 8000
    upsampled = resample(np.sin(2 * np.pi * 50 * t), 8000, 16000)
    assert len(upsampled) == 16000
    reference = np.sin(2 * np.pi * 50 * np.arange(16000) / 16000)
    np.testing.assert_allclose(upsampled[100:-100], reference[100:-100], atol=1e-2)
