"""The image benchmark: the MAF transform and its log-Jacobian, the label marginal, the Gaussian baseline, and
short end-to-end runs on the 8x8 digits, MNIST and CIFAR-10 files written here."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

from frmdn_worldmodels.benchmarks.common import benchmark_memory_config, model_variants, train_or_resume
from frmdn_worldmodels.benchmarks.image import (
    ClassGaussians,
    bits_per_dim,
    dequantize,
    label_log_likelihoods,
    logit_transform,
    marginal_nll,
    pixel_space_nll,
    run,
    sequence_inputs,
    to_pixels,
)
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import load_config
from frmdn_worldmodels.runtime.io import DataError, read_jsonl
from tests.unit.test_bench_common import record_models

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("lam", [1e-6, 0.05])
def test_log_jacobian_matches_autograd(lam):
    x = torch.rand(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, log_jacobian = logit_transform(x, lam)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(
            lambda v: logit_transform(v.view(1, 4, 5), lam)[0].flatten(), x[i].flatten()
        )
        assert torch.allclose(log_jacobian[i], torch.linalg.slogdet(jacobian)[1], rtol=1e-10)


@pytest.mark.parametrize(("lam", "mean", "std"), [(0.05, 0.3, 1.2), (1e-3, -1.0, 2.5)])
def test_pixel_density_of_a_logit_space_gaussian_has_its_closed_form_mass(lam, mean, std):
    """y = logit(s) ~ N(mean, std^2) in logit space. Carried to x in [0, 1] with NLL_x = NLL_y - log|dy/dx|,
    the density must integrate to the Gaussian's mass between logit(lambda) and logit(1 - lambda)."""
    x = torch.linspace(0, 1, 400_001, dtype=torch.float64)[1:-1]
    y, log_jacobian = logit_transform(x[:, None], lam)
    nll_y = -torch.distributions.Normal(mean, std).log_prob(y[:, 0])
    density = torch.exp(-pixel_space_nll(nll_y, log_jacobian))
    integral = torch.trapezoid(density, x).item()
    low, high = math.log(lam / (1 - lam)), math.log((1 - lam) / lam)
    expected = norm.cdf(high, mean, std) - norm.cdf(low, mean, std)
    assert integral == pytest.approx(expected, rel=1e-4)


def test_logistic_in_logit_space_is_uniform_in_pixel_space():
    """A standard logistic y has s = sigmoid(y) uniform, so x = (s - lambda)/(1 - 2 lambda) has the constant
    density 1 - 2 lambda: NLL_x = -D log(1 - 2 lambda) for every x, and
    bits/dim = log2(L) - log2(1 - 2 lambda)."""
    lam, levels = 0.05, 256
    x = torch.rand(10, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, log_jacobian = logit_transform(x, lam)
    nll_y = -(-y - 2 * torch.nn.functional.softplus(-y)).flatten(1).sum(1)  # logistic pdf e^-y / (1 + e^-y)^2
    nll_x = pixel_space_nll(nll_y, log_jacobian)
    assert torch.allclose(nll_x, torch.full((10,), -12 * math.log(1 - 2 * lam), dtype=torch.float64))
    assert bits_per_dim(0.0, 12, levels) == pytest.approx(8.0)
    assert bits_per_dim(nll_x[0].item(), 12, levels) == pytest.approx(8 - math.log2(1 - 2 * lam))


def test_dequantise_and_back_gives_the_pixels():
    pixels = torch.randint(0, 17, (6, 8, 8))
    x = dequantize(pixels, 17, torch.Generator().manual_seed(0))
    assert (x > 0).all() and (x < 1).all()
    y, _ = logit_transform(x, 1e-6)
    assert torch.equal(to_pixels(y, 1e-6, 17), pixels)


def test_sequence_inputs_alignment():
    rows = torch.randn(2, 3, 4)
    y, cond = sequence_inputs(rows, torch.tensor([2, 0]), 3)
    assert y.shape == (2, 4, 4) and torch.equal(y[:, 0], torch.zeros(2, 4)) and torch.equal(y[:, 1:], rows)
    assert cond.shape == (2, 3, 3)
    assert (
        torch.equal(cond[0, :, 2], torch.ones(3))
        and cond[0].sum() == 3
        and torch.equal(cond[1, :, 0], torch.ones(3))
    )


@pytest.mark.parametrize(("kind", "rank"), [("rmdn", 0), ("frmdn", 2)])
def test_label_marginal_matches_brute_force(kind, rank):
    """log p(x|c) for every c and the marginal against a loop over labels, stepping the model row by row."""
    torch.manual_seed(0)
    classes, rows = 3, torch.randn(5, 4, 6)
    model = MemoryModel(6, classes, benchmark_memory_config(kind, 8, 2, rank, 2, 8)).eval()
    with torch.no_grad():
        # Make the flow non-trivial (its last layers start at zero).
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        log_lik = label_log_likelihoods(model, rows, classes, batch_size=2)
        brute = torch.zeros(5, classes, dtype=torch.float64)
        for c in range(classes):
            one_hot = torch.zeros(5, classes)
            one_hot[:, c] = 1
            previous, state = torch.zeros(5, 6), None
            for t in range(4):
                out, state = model.step(previous, one_hot, state)
                brute[:, c] += model.log_prob(rows[:, t], out).double()
                previous = rows[:, t]
    assert torch.allclose(log_lik, brute, atol=1e-4)
    expected = [-math.log(sum(math.exp(v) for v in brute[i].tolist()) / classes) for i in range(5)]
    assert torch.allclose(marginal_nll(log_lik), torch.tensor(expected, dtype=torch.float64), atol=1e-4)


def test_class_gaussians_match_scipy():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    y = rng.standard_normal((80, 5)) @ rng.standard_normal((5, 5)) + labels[:, None] * 2.0
    model = ClassGaussians.fit(torch.from_numpy(y), torch.from_numpy(labels), 2)
    test = rng.standard_normal((7, 5))
    got = model.log_likelihoods(torch.from_numpy(test)).numpy()
    for c in range(2):
        members = y[labels == c]
        reference = multivariate_normal(members.mean(0), np.cov(members.T, bias=True)).logpdf(test)
        np.testing.assert_allclose(got[:, c], reference, rtol=1e-9)
    with pytest.raises(DataError, match="more than 5 training images of class 1"):
        ClassGaussians.fit(torch.from_numpy(y[:44]), torch.from_numpy(labels[:44]), 2)


def small_config(tmp_path, *overrides):
    return load_config(
        None,
        [
            f"runs_dir={json.dumps(str(tmp_path / 'runs'))}",
            "image.memory.hidden=8",
            "image.memory.components=2",
            "image.memory.flow_hidden=8",
            "image.epochs=2",
            "image.batch_size=128",
            "image.samples_per_class=2",
            *overrides,
        ],
    )


def test_digits_run_writes_the_table_and_resumes(tmp_path):
    cfg = small_config(tmp_path, "image.ranks=[1]", "image.max_test=60")
    summary = run(cfg)
    out = tmp_path / "runs" / "tiny" / "benchmarks" / "image"
    for name in (
        "results.md",
        "results.csv",
        "summary.json",
        "models/frmdn_r1/metrics.jsonl",
        "samples_frmdn.png",
        "samples_rmdn.png",
        "nll_curves.png",
        "models/frmdn_r1/best.pt",
        "models/gaussian.json",
    ):
        assert (out / name).exists(), name
    models = [row["model"] for row in summary["results"]]
    assert models == ["Gaussian", "RMDN (d'=1)", "FRMDN (d'=1)"]
    assert summary["test_images"] == 60 and summary["dims"] == 64 and summary["levels"] == 17
    for row in summary["results"]:
        # An upper bound on the pixels' code length: positive, and no model this small beats 4.09 bits by
        # much.
        assert 0 < row["bits_per_dim"] < 12
        assert row["nll_pixel"] == pytest.approx(row["nll"] - summary["mean_log_jacobian"], abs=1e-6)
    table = (out / "results.md").read_text()
    assert "FRMDN (d'=1)" in table and "1344.7 ± 1.8" in table
    metrics = [out / "models" / tag / "metrics.jsonl" for tag in ("rmdn_r1", "frmdn_r1")]
    before = [path.read_text() for path in metrics]
    assert all(
        [row["epoch"] for row in read_jsonl(path) if row["kind"] == "epoch"] == [0, 1, 2] for path in metrics
    )
    again = run(cfg)  # every model is finished: nothing is trained again, the numbers are the same
    assert [path.read_text() for path in metrics] == before
    assert [r["nll"] for r in again["results"]] == [r["nll"] for r in summary["results"]]


def test_raising_the_epoch_budget_continues_training(tmp_path):
    overrides = (
        "image.ranks=[0]",
        "image.kinds=[rmdn]",
        "image.single_gaussian=false",
        "image.patience=0",
        "image.max_train=256",
        "image.max_test=32",
    )
    first = run(small_config(tmp_path, *overrides, "image.epochs=1"))
    second = run(small_config(tmp_path, *overrides, "image.epochs=3"))
    metrics = read_jsonl(
        tmp_path / "runs" / "tiny" / "benchmarks" / "image" / "models" / "rmdn_r0" / "metrics.jsonl"
    )
    assert [row["epoch"] for row in metrics if row["kind"] == "epoch"] == [0, 1, 2, 3]
    assert first["results"][0]["epochs_run"] == 1 and second["results"][0]["epochs_run"] == 3


def write_idx(path, array):
    code = 0x08
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.tobytes())


def write_image_folder(folder: Path, dataset: str) -> Path:
    """A few MNIST IDX files, or CIFAR-10 python batches inside ``cifar-10-batches-py/``, under ``folder``."""
    import pickle

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    if dataset == "mnist":
        for prefix, n in (("train", 24), ("t10k", 6)):
            write_idx(
                folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            )
            write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))
    else:
        batches = folder / "cifar-10-batches-py"
        batches.mkdir()
        for name, n in (("data_batch_1", 20), ("test_batch", 6)):
            batch = {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"labels": (list(range(10)) * 2)[:n],
            }
            (batches / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


SMALL_CLI = (
    "--set",
    "image.memory.hidden=8",
    "--set",
    "image.memory.components=2",
    "--set",
    "image.memory.flow_hidden=8",
    "--set",
    "image.batch_size=128",
    "--set",
    "image.samples_per_class=2",
    "--set",
    "image.epochs=1",
    "--set",
    "image.ranks=[1]",
    "--set",
    "image.kinds=[frmdn]",
    "--set",
    "image.single_gaussian=false",
    "--set",
    "image.threads=1",
)


def test_explicit_dataset_reads_its_folder(tmp_path):
    data = write_image_folder(tmp_path / "mnist", "mnist")
    cfg = small_config(
        tmp_path,
        "image.dataset=mnist",
        f"image.data={json.dumps(str(data))}",
        "image.epochs=1",
        "image.ranks=[0]",
        "image.kinds=[rmdn]",
        "image.single_gaussian=false",
    )
    assert run(cfg)["dataset"] == "mnist"


def assert_refused(result, tmp_path, *fragments):
    assert result.returncode == 2, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not (tmp_path / "runs").exists(), "a refused command must write nothing"


def test_cli_refuses_a_missing_or_unrecognised_data_folder(tmp_path, run_main):
    runs = f"runs_dir={json.dumps(str(tmp_path / 'runs'))}"
    missing = tmp_path / "no" / "such" / "dir"
    assert_refused(
        run_main("benchmark", "image", "--data", str(missing), "--set", runs),
        tmp_path,
        f"error: {missing}: the image data folder does not exist",
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not images")
    assert_refused(
        run_main("benchmark", "image", "--data", str(other), "--set", runs),
        tmp_path,
        f"error: {other}: neither MNIST nor CIFAR-10 files found",
        "train-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "data_batch_1",
        "test_batch",
        "it holds notes.txt",
    )
    cifar = write_image_folder(tmp_path / "cifar", "cifar10")
    assert_refused(
        run_main("benchmark", "image", "--data", str(cifar), "--set", runs, "--set", "image.dataset=mnist"),
        tmp_path,
        f"error: {cifar}: holds CIFAR-10 files, not MNIST ones",
        "image.dataset=cifar10",
    )
    assert_refused(
        run_main("benchmark", "image", "--data", str(cifar), "--set", runs, "--set", "image.dataset=digits"),
        tmp_path,
        "image.dataset=digits takes no data folder",
        str(cifar),
    )


def test_cli_refuses_bad_memory_settings_before_any_work(tmp_path, run_main):
    runs = f"runs_dir={json.dumps(str(tmp_path / 'runs'))}"
    for override, message in (
        ("image.memory.components=0", "image.memory.components must be at least 1, got 0"),  # the loader's
        (
            "image.memory.rank=2",
            (
                "image.memory.rank=2 would be ignored: each model takes its rank from "
                "image.ranks=[0, 1, 2, 3]; to train rank 2 alone, set image.ranks=[2] instead"
            ),
        ),
        ("image.memory.predict_reward=true", "image.memory.predict_reward must be false"),
    ):
        assert_refused(run_main("benchmark", "image", "--set", runs, "--set", override), tmp_path, message)


def test_memory_settings_reach_the_models_and_their_fingerprints(tmp_path, monkeypatch):
    import frmdn_worldmodels.benchmarks.image
    import frmdn_worldmodels.benchmarks.runner

    built = record_models(monkeypatch, frmdn_worldmodels.benchmarks.image)
    resumed = []

    def recording_train(*args, **kwargs):
        result = train_or_resume(*args, **kwargs)
        resumed.append(result.resumed)
        return result

    monkeypatch.setattr(frmdn_worldmodels.benchmarks.runner, "train_or_resume", recording_train)
    overrides = (
        "image.ranks=[1]",
        "image.kinds=[frmdn]",
        "image.single_gaussian=false",
        "image.epochs=1",
        "image.max_train=128",
        "image.max_test=32",
        "image.memory.flow_context=true",
        "image.memory.diag_clamp=[0.1, 1.9]",
        "image.memory.diag_activation=exp",
    )
    cfg = small_config(tmp_path, *overrides)
    run(cfg)
    (model,) = built
    assert model.config.flow_context is True and model.config.diag_clamp == [0.1, 1.9]
    assert model.config.diag_activation == "exp" and (model.config.kind, model.config.rank) == ("frmdn", 1)
    assert (model.config.hidden, model.config.components, model.config.flow_hidden) == (8, 2, 8)
    assert model.flow.context_dim == 8 and model.reward_head is None and model.done_head is None
    ((*_, fingerprint),) = model_variants(cfg.image, {})
    assert fingerprint["memory"] == dataclasses.asdict(model.config)
    other = small_config(tmp_path, *overrides, "image.memory.diag_clamp=[0.2, 1.8]")
    ((*_, other_fingerprint),) = model_variants(other.image, {})
    assert other_fingerprint["memory"]["diag_clamp"] == [0.2, 1.8] and other_fingerprint != fingerprint
    run(cfg)  # the same settings: the finished model is loaded
    run(other)  # another clamp: trained again
    assert built[-1].config.diag_clamp == [0.2, 1.8]
    assert resumed == [False, True, False]


def test_partial_memory_section_keeps_the_benchmark_defaults(tmp_path):
    path = tmp_path / "image.yaml"
    path.write_text("image:\n  memory: {flow_context: true}\n  ranks: [0, 3]\n")
    config = load_config(path).image
    assert (config.memory.hidden, config.memory.components, config.memory.flow_context) == (32, 10, True)
    assert not config.memory.predict_reward and not config.memory.predict_done
    assert [tag for tag, *_ in model_variants(config, {})] == ["rmdn_r0", "rmdn_r3", "frmdn_r0", "frmdn_r3"]


def test_cli_bad_inputs(tmp_path, run_main):
    empty = tmp_path / "empty"
    empty.mkdir()
    runs = f"runs_dir={json.dumps(str(tmp_path / 'runs'))}"
    result = run_main(
        "benchmark", "image", "--set", "image.dataset=mnist", "--set", runs, "--data", str(empty)
    )
    assert result.returncode == 2
    assert f"{empty}: no MNIST train images file found" in result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for prefix, n in (("train", 6), ("t10k", 2)):
        write_idx(broken / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
        write_idx(broken / f"{prefix}-labels-idx1-ubyte", np.zeros(n, np.uint8))
    path = broken / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    result = run_main(
        "benchmark", "image", "--set", "image.dataset=mnist", "--set", runs, "--data", str(broken)
    )
    assert result.returncode == 2
    assert f"error: {path}: IDX file truncated" in result.stderr
    with pytest.raises(DataError, match="--data PATH"):
        run(load_config(None, ["image.dataset=mnist", runs]))
