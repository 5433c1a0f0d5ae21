"""Low-rank-precision Gaussian mixtures against dense float64 references (log-prob, sample moments,
shapes)."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from frmdn_worldmodels.models.mixture import gaussian_log_prob, gmm_log_prob, gmm_sample

F64 = torch.float64


def random_mixture(batch, k, d, r, seed=0, dtype=F64):
    """Well-conditioned random parameters: diag in [0.5, 2], U of moderate size, x near some component."""
    gen = torch.Generator().manual_seed(seed)
    logit_pi = torch.randn(*batch, k, generator=gen, dtype=dtype)
    mu = torch.randn(*batch, k, d, generator=gen, dtype=dtype)
    diag = 0.5 + 1.5 * torch.rand(*batch, k, d, generator=gen, dtype=dtype)
    u = torch.randn(*batch, k, d, r, generator=gen, dtype=dtype) / math.sqrt(max(d, 1)) if r > 0 else None
    x = mu[..., 0, :] + 0.7 * torch.randn(*batch, d, generator=gen, dtype=dtype)
    return x, logit_pi, mu, diag, u


def dense_gmm_log_prob(x, logit_pi, mu, diag, u):
    """The naive reference: build D + U U^T and use torch's dense MultivariateNormal."""
    precision = torch.diag_embed(diag)
    if u is not None:
        precision = precision + u @ u.transpose(-1, -2)
    components = MultivariateNormal(mu, precision_matrix=precision)
    return torch.logsumexp(torch.log_softmax(logit_pi, -1) + components.log_prob(x.unsqueeze(-2)), dim=-1)


@pytest.mark.parametrize("r", [0, 1, 3])
@pytest.mark.parametrize("d", [3, 32, 200])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_log_prob_equals_dense_multivariate_normal_mixture(k, d, r):
    batch = (2,) if d == 200 else (4,)  # the dense reference costs O(K d^3) per element
    x, logit_pi, mu, diag, u = random_mixture(batch, k, d, r, seed=k * 1000 + d * 10 + r)
    expected = dense_gmm_log_prob(x, logit_pi, mu, diag, u)
    got = gmm_log_prob(x, logit_pi, mu, diag, u)
    assert got.shape == batch and got.dtype == F64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("r", [1, 3, 10])  # 10 > UNROLLED_MAX_RANK: the batched-Cholesky path
def test_log_prob_gradients_equal_the_dense_reference_gradients(r):
    params = random_mixture((3, 2), 4, 12, r, seed=20 + r)
    ours = [t.clone().requires_grad_() for t in params]
    dense = [t.clone().requires_grad_() for t in params]
    got_log_prob, expected_log_prob = gmm_log_prob(*ours), dense_gmm_log_prob(*dense)
    torch.testing.assert_close(got_log_prob, expected_log_prob, rtol=1e-10, atol=1e-9)
    got_log_prob.sum().backward()
    expected_log_prob.sum().backward()
    for name, got, expected in zip(("x", "logit_pi", "mu", "diag", "u"), ours, dense):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("batch", [(), (5,), (3, 4)], ids=str)
def test_log_prob_batch_shapes_and_per_component_density(batch):
    x, logit_pi, mu, diag, u = random_mixture(batch, 3, 4, 2, seed=1)
    got = gmm_log_prob(x, logit_pi, mu, diag, u)
    assert got.shape == batch
    torch.testing.assert_close(got, dense_gmm_log_prob(x, logit_pi, mu, diag, u), rtol=1e-10, atol=1e-10)
    per_component = gaussian_log_prob(x, mu, diag, u)
    assert per_component.shape == (*batch, 3)
    dense = MultivariateNormal(mu, precision_matrix=torch.diag_embed(diag) + u @ u.transpose(-1, -2))
    torch.testing.assert_close(per_component, dense.log_prob(x.unsqueeze(-2)), rtol=1e-10, atol=1e-10)


def test_rank_zero_factor_is_the_diagonal_mixture():
    x, logit_pi, mu, diag, _ = random_mixture((6,), 4, 5, 0, seed=2)
    empty_u = torch.zeros(6, 4, 5, 0, dtype=F64)
    torch.testing.assert_close(
        gmm_log_prob(x, logit_pi, mu, diag, empty_u), gmm_log_prob(x, logit_pi, mu, diag)
    )


def test_float32_log_prob_is_close_to_float64():
    x, logit_pi, mu, diag, u = random_mixture((8,), 5, 32, 3, seed=3)
    got = gmm_log_prob(*(t.float() for t in (x, logit_pi, mu, diag, u)))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), gmm_log_prob(x, logit_pi, mu, diag, u), rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------- sampling


def assert_moments(samples, mean, cov, sigmas=5.0):
    """Sample mean and covariance within `sigmas` Monte-Carlo standard errors of the truth (Gaussian data:
    Var(mean_i) = C_ii / N, Var(cov_ij) = (C_ii C_jj + C_ij^2) / N)."""
    n = samples.shape[0]
    variance = cov.diagonal()
    mean_error = (samples.mean(0) - mean).abs() / (variance / n).sqrt()
    assert mean_error.max() < sigmas, f"sample mean off by {mean_error.max():.2f} standard errors"
    cov_se = ((variance[:, None] * variance[None, :] + cov.square()) / n).sqrt()
    cov_error = (torch.cov(samples.T) - cov).abs() / cov_se
    assert cov_error.max() < sigmas, f"sample covariance off by {cov_error.max():.2f} standard errors"


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_low_rank_sample_moments_match_inverse_precision(temperature):
    d, r, n = 4, 2, 200_000
    gen = torch.Generator().manual_seed(4)
    mu = torch.randn(1, d, generator=gen, dtype=F64)
    diag = torch.tensor([[0.3, 1.0, 2.0, 5.0]], dtype=F64)
    u = torch.randn(1, d, r, generator=gen, dtype=F64)  # strong correlations: U U^T is comparable to D
    covariance = temperature * torch.linalg.inv(torch.diag(diag[0]) + u[0] @ u[0].T)
    params = [t.expand(n, *t.shape) for t in (torch.zeros(1, dtype=F64), mu, diag, u)]
    samples = gmm_sample(*params, temperature=temperature, generator=gen)
    assert samples.shape == (n, d)
    assert_moments(samples, mu[0], covariance)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_mixture_sample_frequencies_and_component_moments_with_temperature(temperature):
    """Well-separated components: assign each sample to its nearest mean, then check the component frequencies
    (softmax(logits / tau), binomial standard error) and each component's covariance (tau P_k^-1)."""
    k, d, r, n = 3, 3, 1, 200_000
    gen = torch.Generator().manual_seed(5)
    logit_pi = torch.tensor([0.0, 1.0, -0.5], dtype=F64)
    mu = 40.0 * torch.eye(k, d, dtype=F64)
    diag = 1.0 + torch.rand(k, d, generator=gen, dtype=F64)
    u = torch.randn(k, d, r, generator=gen, dtype=F64)
    params = [t.expand(n, *t.shape) for t in (logit_pi, mu, diag, u)]
    samples = gmm_sample(*params, temperature=temperature, generator=gen)
    nearest = torch.cdist(samples, mu).argmin(-1)
    probs = torch.softmax(logit_pi / temperature, -1)
    counts = torch.bincount(nearest, minlength=k).to(F64)
    freq_error = (counts / n - probs).abs() / (probs * (1 - probs) / n).sqrt()
    assert freq_error.max() < 5, f"component frequencies {counts / n} vs {probs}"
    for j in range(k):
        covariance = temperature * torch.linalg.inv(torch.diag(diag[j]) + u[j] @ u[j].T)
        assert_moments(samples[nearest == j], mu[j], covariance)


def test_zero_temperature_returns_mean_of_most_likely_component():
    _, logit_pi, mu, diag, u = random_mixture((6,), 4, 5, 2, seed=6)
    got = gmm_sample(logit_pi, mu, diag, u, temperature=0.0)
    torch.testing.assert_close(got, mu[torch.arange(6), logit_pi.argmax(-1)])


@pytest.mark.parametrize("batch", [(), (5,), (3, 4)], ids=str)
def test_sample_shapes_and_generator_reproducibility(batch):
    _, logit_pi, mu, diag, u = random_mixture(batch, 3, 4, 2, seed=7)
    first = gmm_sample(logit_pi, mu, diag, u, generator=torch.Generator().manual_seed(9))
    second = gmm_sample(logit_pi, mu, diag, u, generator=torch.Generator().manual_seed(9))
    assert first.shape == (*batch, 4)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_negative_temperature_is_refused():
    _, logit_pi, mu, diag, u = random_mixture((2,), 3, 4, 2)
    with pytest.raises(ValueError, match="temperature"):
        gmm_sample(logit_pi, mu, diag, u, temperature=-1.0)


# ---------------------------------------------------------------- extreme parameters


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize(
    "diag_value, u_scale",
    [(1e-6, 1.0), (1e6, 1.0), (1e-6, 1e3), (1e6, 1e3), (1.0, 1e3), (1e-4, 1e4)],
)
def test_gradients_and_samples_are_finite_at_extreme_parameters(diag_value, u_scale, dtype):
    k, d, r = 5, 32, 3
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, d, generator=gen).to(dtype)
    logit_pi = torch.randn(6, k, generator=gen).to(dtype).requires_grad_()
    mu = torch.randn(6, k, d, generator=gen).to(dtype).requires_grad_()
    # spread the diagonal over two orders of magnitude around the extreme value
    diag = (diag_value * torch.logspace(-1, 1, d).expand(6, k, d)).to(dtype).requires_grad_()
    u = (u_scale * torch.randn(6, k, d, r, generator=gen)).to(dtype).requires_grad_()
    log_prob = gmm_log_prob(x, logit_pi, mu, diag, u)
    assert log_prob.isfinite().all()
    log_prob.sum().backward()
    for name, tensor in [("logit_pi", logit_pi), ("mu", mu), ("diag", diag), ("u", u)]:
        assert tensor.grad.isfinite().all(), f"non-finite gradient for {name}"
    with torch.no_grad():
        assert gmm_sample(logit_pi, mu, diag, u, 1.3, generator=gen).isfinite().all()


def test_extreme_log_det_matches_float64_dense_reference():
    """Tiny diagonal and large U (condition number ~1e10): the lemma in float64 still agrees with a dense
    slogdet."""
    d, r = 32, 3
    gen = torch.Generator().manual_seed(10)
    diag = 1e-4 * torch.logspace(-1, 1, d, dtype=F64)
    u = 30.0 * torch.randn(d, r, generator=gen, dtype=F64)
    x = torch.randn(d, generator=gen, dtype=F64) * 1e-2
    precision = torch.diag(diag) + u @ u.T
    expected = 0.5 * (
        torch.linalg.slogdet(precision).logabsdet - x @ precision @ x - d * math.log(2 * math.pi)
    )
    got = gmm_log_prob(x, torch.zeros(1, dtype=F64), torch.zeros(1, d, dtype=F64), diag[None], u[None])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-6)


# ---------------------------------------------------------------- shape errors


def _shapes_case(name):
    x, logit_pi, mu, diag, u = random_mixture((4,), 3, 5, 2)
    bad = {
        "x_dim": {"x": x[:, :4]},
        "x_batch": {"x": x[:1]},  # [1, 5] against batch [4] must not broadcast
        "x_missing_batch": {"x": x[0]},  # [5] would broadcast over the batch
        "logit_k": {"logit_pi": logit_pi[:, :2]},
        "logit_batch": {"logit_pi": logit_pi[:1]},  # [1, 3] would broadcast
        "diag_d": {"diag": diag[..., :4]},
        "diag_batch": {"diag": diag[:1]},
        "u_d": {"u": u[:, :, :4]},
        "u_k": {"u": u[:, :2]},
        "u_missing_rank_axis": {"u": u[..., 0]},
    }[name]
    args = {"x": x, "logit_pi": logit_pi, "mu": mu, "diag": diag, "u": u} | bad
    return args, bad


@pytest.mark.parametrize(
    "name",
    [
        "x_dim",
        "x_batch",
        "x_missing_batch",
        "logit_k",
        "logit_batch",
        "diag_d",
        "diag_batch",
        "u_d",
        "u_k",
        "u_missing_rank_axis",
    ],
)
def test_mismatched_shapes_raise_value_error_naming_the_shapes(name):
    args, bad = _shapes_case(name)
    ((bad_name, bad_tensor),) = bad.items()
    with pytest.raises(ValueError) as error:
        gmm_log_prob(**args)
    message = str(error.value)
    assert str(tuple(bad_tensor.shape)) in message and f"{bad_name} " in message, message
    assert str(tuple(args["mu"].shape)) in message, message
    if bad_name != "x":
        sample_args = {key: value for key, value in args.items() if key != "x"}
        with pytest.raises(
            ValueError, match=str(tuple(bad_tensor.shape)).replace("(", r"\(").replace(")", r"\)")
        ):
            gmm_sample(**sample_args)


def test_mu_without_component_axis_is_refused():
    with pytest.raises(ValueError, match="mu"):
        gmm_log_prob(torch.zeros(3), torch.zeros(1), torch.zeros(3), torch.ones(3))
