r"""Image NLL benchmark (FRMDN paper, Table 3): ``python run.py benchmark image [--data PATH]``.

Each image is a sequence of rows; the memory model reads the previous row and the one-hot label and predicts
the next row, so :math:`p(x \mid c) = \prod_t p(x_t \mid x_{<t}, c)`. The protocol is MAF's
(Papamakarios et al., 2017), which the paper follows:

- dequantise: :math:`x = (\text{pixel} + u) / L`, :math:`u \sim U(0, 1)`, with L intensity levels
  (256 for MNIST and CIFAR-10; 17 for scikit-learn's 8x8 digits, whose pixels are 0..16: we keep their 17
  levels instead of stretching them to 256, which would leave most of the 256 bins empty);
- logit transform: :math:`s = \lambda + (1 - 2\lambda) x`, :math:`y = \operatorname{logit}(s)`
  (:math:`\lambda = 10^{-6}` for MNIST and digits, 0.05 for CIFAR-10);
- the reported NLL marginalises the label under a uniform prior,
  :math:`-\log \frac1C \sum_c p(y \mid c)`, in nats in logit space (comparable with MAF's tables), and also
  in bits per dimension in pixel space:
  :math:`\mathrm{NLL}_x = \mathrm{NLL}_y - \sum_i \log\lvert dy_i/dx_i\rvert` with
  :math:`\log\lvert dy/dx\rvert = \log(1 - 2\lambda) - \log s - \log(1 - s)`, and
  bits/dim :math:`= (\mathrm{NLL}_x + D \log L) / (D \log 2)`.

Bits/dim is an upper bound on the code length of the discrete pixels, so on average it can never be negative:
a model scoring below 0 has lost a log-determinant somewhere (docs/architecture.md).

Models: RMDN and FRMDN (``image.kinds``) with each rank d' in ``image.ranks``, all with the settings of
``image.memory`` (K, the LSTM, the flow, the diagonal's clamp), plus a class-conditional full-covariance
Gaussian fitted in logit space by maximum likelihood (closed form).

Data: ``image.dataset: auto`` (the default) benchmarks scikit-learn's 8x8 digits without ``--data``, and with
``--data PATH`` MNIST or CIFAR-10 as the folder's files say (IDX files ``train-images-idx3-ubyte``...,
or python batches ``data_batch_1..5``, ``test_batch``); a folder holding neither is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from frmdn_worldmodels.benchmarks.common import (
    cached_result,
    check_model_grid,
    format_number,
    markdown_table,
    model_label,
    store_result,
    torch_threads,
    write_csv,
)
from frmdn_worldmodels.benchmarks.datasets import ImageSplits, load_image_splits
from frmdn_worldmodels.benchmarks.runner import ModelRun, Task, train_grid
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import Config, ImageConfig
from frmdn_worldmodels.runtime.io import DataError, atomic_write_bytes, atomic_write_text, write_json
from frmdn_worldmodels.runtime.paths import prepare_stage, run_paths
from frmdn_worldmodels.runtime.progress import note

# The paper's Table 3 as printed: (row, MNIST, CIFAR-10) test NLL in nats in logit space. The first six rows
# are MAF's conditional-density table (Papamakarios et al., 2017) with the sign flipped.
PAPER_TABLE3: list[tuple[str, str, str]] = [
    ("Gaussian", "1344.7 ± 1.8", "-2030 ± 41"),
    ("MADE (K=1)", "1361.9 ± 1.9", "-187 ± 20"),
    ("MADE (K=10)", "1030.3 ± 1.7", "119 ± 20"),
    ("RealNVP (K=1)", "1326.3 ± 5.8", "-2642 ± 26"),
    ("MAF (K=1)", "1302.9 ± 1.7", "-2983 ± 26"),
    ("MAF (K=10)", "1092.3 ± 1.7", "-2936 ± 26"),
    ("RMDN (diagonal)", "1209.86", "-2649.27"),
    ("RMDN (d'=1)", "1206.11", "-2811.65"),
    ("RMDN (d'=2)", "1195.41", "-3078.6"),
    ("RMDN (d'=3)", "1189.89", "-3096.23"),
    ("FRMDN (diagonal)", "196.79", "-3032.25"),
    ("FRMDN (d'=1)", "189.51", "-3135.29"),
    ("FRMDN (d'=2)", "137.29", "-3146.75"),
    ("FRMDN (d'=3)", "-89.89", "-3159.8"),
]
PAPER_COLUMN = {"mnist": 1, "cifar10": 2}
EVAL_NOISE_SEED = 7919  # the validation and test sets are dequantised once, with their own fixed noise


def default_lambda(dataset: str) -> float:
    """The logit transform's lambda of the MAF protocol: 0.05 for CIFAR-10, 1e-6 otherwise."""
    return 0.05 if dataset == "cifar10" else 1e-6


# --------------------------------------------------------------------------------------------- the transform


def image_rows(images: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """``[N, H, W]`` or ``[N, H, W, ch]`` -> ``[N, H, W * ch]``: each image row (all its channels) is one
    step."""
    return images.reshape(images.shape[0], images.shape[1], -1)


def dequantize(pixels: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """x = (pixel + u) / L with u ~ U(0, 1), in float64: x lies in (0, 1)."""
    pixels = pixels.to(torch.float64)
    noise = torch.rand(pixels.shape, generator=generator, dtype=torch.float64, device=pixels.device)
    return (pixels + noise) / levels


def logit_transform(x: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """y = logit(lambda + (1 - 2 lambda) x) and, per image, sum_i log|dy_i/dx_i| (every dim after the
    first)."""
    s = lam + (1 - 2 * lam) * x
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    log_jacobian = (math.log(1 - 2 * lam) - log_s - log_1ms).flatten(1).sum(1)
    return log_s - log_1ms, log_jacobian


def inverse_logit_transform(y: Tensor, lam: float) -> Tensor:
    """x = (sigmoid(y) - lambda) / (1 - 2 lambda)."""
    return (torch.sigmoid(y) - lam) / (1 - 2 * lam)


def pixel_space_nll(nll_logit: Tensor | float, log_jacobian: Tensor | float) -> Tensor | float:
    """NLL_x = NLL_y - sum_i log|dy_i/dx_i| (change of variables from logit space back to x in [0, 1])."""
    return nll_logit - log_jacobian


def bits_per_dim(nll_pixel: Tensor | float, dims: int, levels: int) -> Tensor | float:
    """(NLL_x + D log L) / (D log 2): x's density at the scale of the discrete pixels, in bits per
    dimension."""
    return (nll_pixel + dims * math.log(levels)) / (dims * math.log(2))


def to_pixels(y: Tensor, lam: float, levels: int) -> Tensor:
    """Logit-space rows back to integer pixel levels 0..L-1 (for the sample grid)."""
    x = inverse_logit_transform(y.to(torch.float64), lam)
    return (x * levels).floor().clamp(0, levels - 1).to(torch.int64)


# ------------------------------------------------------------------------------------- class-conditional NLL


def sequence_inputs(rows: Tensor, labels: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """rows [B, H, W'] and labels [B] -> (y [B, H+1, W'] with a zero row first, cond [B, H, C] one-hot).

    The model reads (y_t, c) at step t and predicts row t+1, so step 0 reads the zero row and the label."""
    zero = rows.new_zeros(rows.shape[0], 1, rows.shape[2])
    one_hot = torch.nn.functional.one_hot(labels.to(torch.int64), classes).to(rows.dtype)
    cond = one_hot[:, None, :].expand(-1, rows.shape[1], -1)
    return torch.cat([zero, rows], dim=1), cond


def conditional_log_likelihood(model: MemoryModel, rows: Tensor, labels: Tensor, classes: int) -> Tensor:
    """log p(x | label) = sum over rows of log p(row_t | rows_<t, label), shape [B]."""
    y, cond = sequence_inputs(rows, labels, classes)
    log_prob, _ = model.sequence_log_prob(y, cond)
    return log_prob.sum(1)


def eval_batch_size(model: MemoryModel, rows: Tensor, budget: int = 20_000_000) -> int:
    """Images per forward pass so that the mixture parameters (B T K d max(r, 1) numbers) stay near
    ``budget``."""
    config = model.config
    per_image = rows.shape[1] * config.components * model.target_dim * max(config.rank, 1)
    return max(1, budget // per_image)


def label_log_likelihoods(
    model: MemoryModel, rows: Tensor, classes: int, batch_size: int | None = None
) -> Tensor:
    """log p(x | c) for every image and every label c: float64 [N, C]."""
    batch_size = batch_size or max(1, eval_batch_size(model, rows) // classes)
    out = []
    for chunk in rows.split(batch_size):
        labels = torch.arange(classes, device=chunk.device).repeat(len(chunk))
        log_lik = conditional_log_likelihood(model, chunk.repeat_interleave(classes, 0), labels, classes)
        out.append(log_lik.view(len(chunk), classes).double())
    return torch.cat(out)


def marginal_nll(log_likelihoods: Tensor) -> Tensor:
    """-log (1/C) sum_c p(x | c) from log p(x | c) [N, C] (a uniform label prior), shape [N]."""
    classes = log_likelihoods.shape[-1]
    return math.log(classes) - torch.logsumexp(log_likelihoods, dim=-1)


@dataclass
class ClassGaussians:
    """One full-covariance Gaussian per class, fitted by maximum likelihood (sample mean and biased
    covariance)."""

    mean: Tensor
    """[C, D]"""
    scale_tril: Tensor
    """[C, D, D] Cholesky factor of each class's covariance."""

    @classmethod
    def fit(cls, y: Tensor, labels: Tensor, classes: int) -> ClassGaussians:
        y = y.to(torch.float64).flatten(1)
        means, factors = [], []
        for c in range(classes):
            members = y[labels == c]
            if len(members) <= y.shape[1]:
                raise DataError(
                    f"the Gaussian baseline needs more than {y.shape[1]} training images of class {c} "
                    f"for a full covariance, got {len(members)} "
                    "(raise image.max_train or set image.single_gaussian=false)"
                )
            mean = members.mean(0)
            centred = members - mean
            covariance = centred.T @ centred / len(members)
            factor, info = torch.linalg.cholesky_ex(covariance)
            if info.item() != 0:
                raise DataError(f"the Gaussian baseline's covariance of class {c} is singular")
            means.append(mean)
            factors.append(factor)
        return cls(torch.stack(means), torch.stack(factors))

    def log_likelihoods(self, y: Tensor) -> Tensor:
        """log N(y; mean_c, cov_c) for every image and class: [N, C]."""
        y = y.to(torch.float64).flatten(1)
        dims = y.shape[1]
        out = []
        for mean, factor in zip(self.mean, self.scale_tril, strict=True):
            whitened = torch.linalg.solve_triangular(factor, (y - mean).T, upper=False)
            log_det = 2 * factor.diagonal().log().sum()
            out.append(-0.5 * (whitened.square().sum(0) + log_det + dims * math.log(2 * math.pi)))
        return torch.stack(out, dim=1)


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class EvalSet:
    """A validation or test set, dequantised once with fixed noise."""

    rows: Tensor
    """float32 [N, H, W'] logit-space rows."""
    log_jacobian: Tensor
    """float64 [N] sum_i log|dy_i/dx_i|."""
    labels: Tensor
    """int64 [N]."""


def _eval_set(images: np.ndarray, labels: np.ndarray, levels: int, lam: float, seed: int, device) -> EvalSet:
    generator = torch.Generator().manual_seed(seed)
    y, log_jacobian = logit_transform(
        dequantize(torch.from_numpy(image_rows(images)), levels, generator), lam
    )
    return EvalSet(y.float().to(device), log_jacobian, torch.from_numpy(labels).to(device))


def check_image_config(cfg: Config) -> None:
    """Every image setting, before any file is read or written (``ConfigError`` naming the field); the data
    folder is checked when it is read, still before anything is written."""
    config = cfg.image
    check_model_grid(config, "image")


def _scores(log_lik: Tensor, data: EvalSet, levels: int) -> dict:
    """Marginal NLL (logit space, nats) with 2 standard errors, the pixel-space NLL, bits/dim, and the
    accuracy of classifying by argmax_c p(x | c) (a by-product of the marginal)."""
    log_lik = log_lik.cpu()
    nll = marginal_nll(log_lik)
    nll_x = pixel_space_nll(nll, data.log_jacobian)
    dims = data.rows.shape[1] * data.rows.shape[2]
    labels = data.labels.cpu()
    return {
        "nll": nll.mean().item(),
        "nll_2se": 2 * nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else math.nan,
        "nll_pixel": nll_x.mean().item(),
        "bits_per_dim": bits_per_dim(nll_x.mean().item(), dims, levels),
        "conditional_nll": -log_lik.gather(1, labels[:, None]).mean().item(),
        "accuracy": (log_lik.argmax(1) == labels).double().mean().item(),
    }


def _sample_grid(
    model: MemoryModel, splits: ImageSplits, lam: float, per_class: int, seed: int, device
) -> np.ndarray:
    """Class-conditioned samples at temperature 1: [C, per_class, H, W(, ch)] integer pixel levels."""
    shape = splits.images["train"].shape[1:]
    height, width = shape[0], math.prod(shape[1:])
    labels = torch.arange(splits.classes, device=device).repeat_interleave(per_class)
    _, cond = sequence_inputs(torch.zeros(len(labels), 1, width, device=device), labels, splits.classes)
    generator = torch.Generator(device=device).manual_seed(seed)
    row, state, rows = torch.zeros(len(labels), width, device=device), None, []
    with torch.no_grad():
        for _ in range(height):
            out, state = model.step(row, cond[:, 0], state)
            row = model.sample(out, generator=generator)
            rows.append(row)
    pixels = to_pixels(torch.stack(rows, dim=1), lam, splits.levels).cpu().numpy()
    return pixels.reshape(splits.classes, per_class, *shape)


def _save_grid(path: Path, grid: np.ndarray, levels: int) -> None:
    """A PNG mosaic: one row of samples per class, upscaled so 8x8 digits are visible."""
    import io

    import matplotlib.image

    classes, per_class, height, width = grid.shape[:4]
    colour = grid.ndim == 5
    scale = max(1, 64 // max(height, width))
    pad = 1
    canvas = np.ones(
        (classes * (height + pad) + pad, per_class * (width + pad) + pad) + ((3,) if colour else ()),
        np.float64,
    )
    for c in range(classes):
        for j in range(per_class):
            top, left = pad + c * (height + pad), pad + j * (width + pad)
            canvas[top : top + height, left : left + width] = grid[c, j] / (levels - 1)
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, canvas, cmap=None if colour else "gray", vmin=0.0, vmax=1.0, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def run(cfg: Config) -> dict:
    """Train and score every model of the table; outputs go to ``<run>/benchmarks/image``."""
    with torch_threads(cfg.image.threads):
        return _run(cfg)


def _subsets(
    config: ImageConfig, splits: ImageSplits, lam: float, device
) -> tuple[np.ndarray, np.ndarray, dict[str, EvalSet]]:
    """The training images and labels (the first ``max_train``; 0 = all), and the validation and test sets
    (the first ``max_test``), each dequantised once with its own fixed noise."""
    train_images, train_labels = splits.images["train"], splits.labels["train"]
    if config.max_train:
        train_images, train_labels = train_images[: config.max_train], train_labels[: config.max_train]
    evals = {}
    for split, offset in (("val", 1), ("test", 2)):
        images, labels = splits.images[split], splits.labels[split]
        if config.max_test:
            images, labels = images[: config.max_test], labels[: config.max_test]
        evals[split] = _eval_set(images, labels, splits.levels, lam, EVAL_NOISE_SEED + offset, device)
    return train_images, train_labels, evals


def _gaussian_row(
    cfg: Config, splits: ImageSplits, train_rows: Tensor, train_labels: np.ndarray, evals: dict, lam: float
) -> dict:
    """The result row of the class-conditional Gaussians, fitted on the training set dequantised once."""
    generator = torch.Generator().manual_seed(cfg.seed)
    x = dequantize(train_rows, splits.levels, generator)
    gaussians = ClassGaussians.fit(logit_transform(x, lam)[0], torch.from_numpy(train_labels), splits.classes)
    test = evals["test"]
    return {
        "model": "Gaussian",
        "tag": "gaussian",
        "kind": "gaussian",
        "rank": None,
        **_scores(gaussians.log_likelihoods(test.rows.cpu()), test, splits.levels),
        "val_nll": marginal_nll(gaussians.log_likelihoods(evals["val"].rows.cpu())).mean().item(),
    }


def image_task(
    cfg: Config,
    splits: ImageSplits,
    train_rows: Tensor,
    train_labels: np.ndarray,
    evals: dict[str, EvalSet],
    lam: float,
    flip: bool,
    device,
) -> Task:
    r"""The image data set's part of the run: training rows dequantised afresh every epoch (and flipped, with
    ``flip``), the loss :math:`-\log p(x \mid c)` given the true label, the same on the validation set, and
    the test scores of :func:`_scores` (the label marginalised)."""
    config, test = cfg.image, evals["test"]
    height, channels = test.rows.shape[1], 3 if splits.images["train"].ndim == 4 else 1
    label_tensor = torch.from_numpy(train_labels)

    def epoch_batches(epoch: int):
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(train_rows), generator=generator)
        for index in order.split(config.batch_size):
            pixels = train_rows[index]
            if flip:  # flip each chosen image left-right, keeping the channels of a pixel together
                chosen = torch.rand(len(index), generator=generator) < 0.5
                flipped = pixels.view(len(index), height, -1, channels).flip(2).reshape(pixels.shape)
                pixels = torch.where(chosen[:, None, None], flipped, pixels)
            y, _ = logit_transform(dequantize(pixels, splits.levels, generator), lam)
            yield y.float().to(device), label_tensor[index].to(device)

    def batch_loss(model: MemoryModel, batch) -> tuple[Tensor, int]:
        y, labels = batch
        return -conditional_log_likelihood(model, y, labels, splits.classes).mean(), len(y)

    def validate(model: MemoryModel) -> float:
        val, size = evals["val"], eval_batch_size(model, evals["val"].rows)
        chunks = zip(val.rows.split(size), val.labels.split(size), strict=True)
        return (
            torch.cat([-conditional_log_likelihood(model, r, c, splits.classes) for r, c in chunks])
            .mean()
            .item()
        )

    def test_metrics(model: MemoryModel) -> dict:
        with torch.no_grad():
            log_lik = label_log_likelihoods(model, test.rows, splits.classes)
        return _scores(log_lik, test, splits.levels)

    return Task(
        build=lambda memory: MemoryModel(test.rows.shape[2], splits.classes, memory).to(device),
        epoch_batches=epoch_batches,
        batches_per_epoch=-(-len(train_rows) // config.batch_size),
        batch_loss=batch_loss,
        validate=validate,
        test_metrics=test_metrics,
        label=lambda memory: model_label(memory.kind, memory.rank),
        val_key="val_nll",
        curve_label="validation NLL given the label (nats, logit space)",
    )


def _write_samples(
    cfg: Config, out_dir: Path, runs: list[ModelRun], splits: ImageSplits, lam: float, device
) -> dict:
    """A PNG of class-conditioned samples of each kind's model with the best validation NLL (the first one
    on a tie)."""
    best: dict[str, ModelRun] = {}
    for run in runs:
        if run.kind not in best or run.trained.best_val < best[run.kind].trained.best_val:
            best[run.kind] = run
    samples = {}
    for kind, run in best.items():
        grid = _sample_grid(run.model, splits, lam, cfg.image.samples_per_class, cfg.seed, device)
        path = out_dir / f"samples_{kind}.png"
        _save_grid(path, grid, splits.levels)
        samples[kind] = {"model": run.tag, "png": str(path)}
    return samples


def _run(cfg: Config) -> dict:
    config = cfg.image
    check_image_config(cfg)
    splits = load_image_splits(config.dataset, config.data, cfg.seed)
    if config.dataset == "auto" and config.data:
        what = "MNIST IDX files" if splits.name == "mnist" else "CIFAR-10 python batches"
        note(f"image.dataset=auto: {config.data} holds {what}, so this is the {splits.name} benchmark")
    lam = config.logit_lambda if config.logit_lambda is not None else default_lambda(splits.name)
    device = torch.device(cfg.device)
    out_dir = prepare_stage(cfg, run_paths(cfg).benchmarks / "image")
    train_images, train_labels, evals = _subsets(config, splits, lam, device)
    train_rows = torch.from_numpy(image_rows(train_images))
    test = evals["test"]
    height, width = test.rows.shape[1:]
    dims = height * width
    data_fingerprint = {
        "dataset": splits.name,
        "data": config.data,
        "lambda": lam,
        "levels": splits.levels,
        "seed": cfg.seed,
        "max_train": config.max_train,
        "max_test": config.max_test,
        "train_images": len(train_images),
    }
    note(
        f"image benchmark on {splits.name}: {len(train_images)} train / {len(evals['val'].rows)} val / "
        f"{len(test.rows)} test images, {height} rows of {width} values, {splits.levels} levels, "
        f"lambda={lam:g}"
    )
    rows: list[dict] = []
    if config.single_gaussian:
        fingerprint = {**data_fingerprint, "model": "gaussian"}
        result = cached_result(out_dir / "models" / "gaussian.json", fingerprint)
        if result is None:
            result = _gaussian_row(cfg, splits, train_rows, train_labels, evals, lam)
            store_result(out_dir / "models" / "gaussian.json", fingerprint, result)
        rows.append(result)
    flip = config.flip and splits.name == "cifar10"
    task = image_task(cfg, splits, train_rows, train_labels, evals, lam, flip, device)
    runs = train_grid(cfg, config, out_dir, data_fingerprint, task, flip=flip)
    rows += [run.result for run in runs]
    samples = _write_samples(cfg, out_dir, runs, splits, lam, device)
    mean_log_jacobian = test.log_jacobian.mean().item()
    warnings = [
        f"{row['model']}: {row['bits_per_dim']:.3f} bits/dim < 0 is impossible for a normalised density"
        for row in rows
        if row["bits_per_dim"] < 0
    ]
    for warning in warnings:
        note("warning: " + warning)
    _write_tables(out_dir, splits, rows, dims, lam, mean_log_jacobian)
    summary = {
        "dataset": splits.name,
        "levels": splits.levels,
        "lambda": lam,
        "dims": dims,
        "test_images": len(test.rows),
        "train_images": len(train_images),
        "mean_log_jacobian": mean_log_jacobian,
        "results": rows,
        "samples": samples,
        "warnings": warnings,
        "results_md": str(out_dir / "results.md"),
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def _paper_bits(text: str, dims: int, levels: int, mean_log_jacobian: float) -> float:
    """The bits/dim a paper NLL (logit space) implies on our test set's log-Jacobian (same data, same
    lambda)."""
    return bits_per_dim(float(text.split("±")[0]) - mean_log_jacobian, dims, levels)


DATASET_NAMES = {"digits": "8x8 digits", "mnist": "MNIST", "cifar10": "CIFAR-10"}
CSV_HEADERS = [
    "source",
    "model",
    "dataset",
    "nll_logit_nats",
    "nll_2se",
    "nll_pixel_nats",
    "bits_per_dim",
    "accuracy",
]


def _table_rows(
    splits: ImageSplits, rows: list[dict], dims: int, mean_log_jacobian: float
) -> tuple[list[list[str]], list[list]]:
    """The Markdown rows (the paper's models, then ours that it lacks) and the CSV rows of our results."""
    ours = {row["model"]: row for row in rows}
    paper_column = PAPER_COLUMN.get(splits.name)
    paper_names = [row[0] for row in PAPER_TABLE3]
    table, csv_rows = [], []
    for model_name in paper_names + [row["model"] for row in rows if row["model"] not in paper_names]:
        paper = next((row for row in PAPER_TABLE3 if row[0] == model_name), None)
        mine = ours.get(model_name)
        line = [
            model_name,
            f"{mine['nll']:.2f} ± {mine['nll_2se']:.2f}" if mine else "—",
            format_number(mine["bits_per_dim"], 3) if mine else "—",
            format_number(mine["accuracy"], 3) if mine else "—",
            paper[1] if paper else "—",
            paper[2] if paper else "—",
        ]
        if paper_column:
            line.append(
                format_number(_paper_bits(paper[paper_column], dims, splits.levels, mean_log_jacobian), 3)
                if paper
                else "—"
            )
        table.append(line)
        if mine:
            fields = ("nll", "nll_2se", "nll_pixel", "bits_per_dim", "accuracy")
            csv_rows.append(["ours", model_name, splits.name, *(mine[field] for field in fields)])
    return table, csv_rows


def _paper_csv_rows() -> list[list]:
    """The paper's Table 3 as CSV rows: (value, 2 standard errors or empty) per data set."""
    csv_rows = []
    for paper in PAPER_TABLE3:
        for column, dataset in ((1, "mnist"), (2, "cifar10")):
            value = float(paper[column].split("±")[0])
            error = float(paper[column].split("±")[1]) if "±" in paper[column] else ""
            csv_rows.append(["paper", paper[0], dataset, value, error, "", "", ""])
    return csv_rows


def _write_tables(
    out_dir: Path, splits: ImageSplits, rows: list[dict], dims: int, lam: float, mean_log_jacobian: float
) -> None:
    name = DATASET_NAMES[splits.name]
    paper_column = PAPER_COLUMN.get(splits.name)
    headers = [
        "Model",
        f"ours: {name} NLL (nats, logit space)",
        "ours: bits/dim",
        "ours: classification acc.",
        "paper: MNIST",
        "paper: CIFAR10",
    ]
    if paper_column:
        headers.append(f"paper's {name} NLL as bits/dim on our test set")
    table, csv_rows = _table_rows(splits, rows, dims, mean_log_jacobian)
    write_csv(out_dir / "results.csv", CSV_HEADERS, csv_rows + _paper_csv_rows())
    text = [
        f"# Image NLL benchmark (paper Table 3) on {name}\n",
        f"Test NLL, -log (1/C) sum_c p(x|c) with a uniform label prior, in nats in logit space "
        f"(lambda = {lam:g}, {splits.levels} levels, D = {dims}); ± is 2 standard errors over test images. "
        "bits/dim is the same density in pixel space: (NLL_y - sum log|dy/dx| + D log L) / (D log 2); "
        "it cannot be negative for a correct density. The paper's columns are copied from its Table 3 "
        "(MNIST and CIFAR-10), for reference"
        + (
            "; our data set differs, so only the rows' order is comparable."
            if not paper_column
            else (
                "; the last column converts them with our test set's mean sum log|dy/dx| = "
                f"{mean_log_jacobian:.1f}."
            )
        )
        + "\n",
        markdown_table(headers, table),
    ]
    atomic_write_text(out_dir / "results.md", "\n".join(text))
