r"""Gaussian mixtures with low-rank-plus-diagonal precision matrices (FRMDN paper, section 4.1).

Component k has mean :math:`\mu_k` and precision :math:`P_k = D_k + U_k U_k^\top`, with :math:`D_k` diagonal
(positive) and :math:`U_k \in \mathbb{R}^{d \times r}`. Everything is exact and costs :math:`O(K d r^2)`; no
:math:`d \times d` matrix is ever formed.

With :math:`b = x - \mu_k` and the whitened factor :math:`V = D^{-1/2} U`, :math:`M = I_r + V^\top V`:

.. math::
    b^\top P b = \textstyle\sum_i D_i b_i^2 + \lVert U^\top b \rVert^2, \qquad
    \log\det P = \textstyle\sum_i \log D_i + \log\det M \quad \text{(matrix determinant lemma)}.

Sampling uses :math:`P^{-1} = D^{-1/2} (I + V V^\top)^{-1} D^{-1/2}`: if :math:`w = \epsilon + V \eta` with
:math:`\epsilon \sim N(0, I_d)`, :math:`\eta \sim N(0, I_r)`, then :math:`\mathrm{Cov}(w) = I + V V^\top` and
:math:`x = \mu + D^{-1/2} (I + V V^\top)^{-1} w` has covariance :math:`P^{-1}`; the inverse is applied by
Woodbury, :math:`(I + V V^\top)^{-1} w = w - V M^{-1} V^\top w`, with an :math:`r \times r` Cholesky.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_shapes(
    logit_pi: Tensor, mu: Tensor, diag: Tensor, u: Tensor | None, x: Tensor | None = None
) -> None:
    """Refuse shapes that would broadcast into something else than the caller meant."""

    def fail(message: str) -> None:
        shapes = f"logit_pi {tuple(logit_pi.shape)}, mu {tuple(mu.shape)}, diag {tuple(diag.shape)}"
        shapes += f", u {tuple(u.shape)}" if u is not None else ", u None"
        if x is not None:
            shapes = f"x {tuple(x.shape)}, " + shapes
        raise ValueError(f"{message} (got {shapes})")

    if mu.dim() < 2:
        fail("mu must be [..., K, d]")
    batch, (k, d) = mu.shape[:-2], mu.shape[-2:]
    if logit_pi.shape != (*batch, k):
        fail("logit_pi must be [..., K] with the batch shape and K of mu [..., K, d]")
    if diag.shape != mu.shape:
        fail("diag must have the shape of mu [..., K, d]")
    if u is not None and (u.dim() != mu.dim() + 1 or u.shape[:-1] != mu.shape):
        fail("u must be [..., K, d, r] with the batch shape, K and d of mu")
    if x is not None and x.shape != (*batch, d):
        fail("x must be [..., d] with the batch shape and d of mu [..., K, d]")


def _whitened_gram_cholesky(diag: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """V = D^{-1/2} U and the Cholesky factor L of M = I + V^T V (computed in float64: M's entries can reach
    1e12 at extreme parameters, where a float32 Cholesky breaks down; the r x r work is negligible)."""
    v = u / diag.sqrt().unsqueeze(-1)
    v64 = v.double()
    rank = u.shape[-1]
    gram = v64.transpose(-1, -2) @ v64 + torch.eye(rank, dtype=torch.float64, device=u.device)
    return v, torch.linalg.cholesky(gram)


def gaussian_log_prob(x: Tensor, mu: Tensor, diag: Tensor, u: Tensor | None = None) -> Tensor:
    r"""Per-component :math:`\log N(x; \mu_k, (D_k + U_k U_k^\top)^{-1})`.

    Args:
        x: ``[..., d]``, broadcast against the component axis.
        mu, diag: ``[..., K, d]``; u: ``[..., K, d, r]`` or None.

    Returns: ``[..., K]``.
    """
    d = mu.shape[-1]
    b = x.unsqueeze(-2) - mu
    mahalanobis = (diag * b.square()).sum(-1)
    log_det = diag.log().sum(-1)
    if u is not None and u.shape[-1] > 0:
        mahalanobis = mahalanobis + (b.unsqueeze(-2) @ u).squeeze(-2).square().sum(-1)
        _, chol = _whitened_gram_cholesky(diag, u)
        log_det = log_det + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1).to(x.dtype)
    return 0.5 * (log_det - mahalanobis - d * math.log(2 * math.pi))


def gmm_log_prob(x: Tensor, logit_pi: Tensor, mu: Tensor, diag: Tensor, u: Tensor | None = None) -> Tensor:
    r"""Log density of :math:`x` under :math:`\sum_k \mathrm{softmax}(\text{logit\_pi})_k\,
    N(x; \mu_k, (D_k + U_k U_k^\top)^{-1})`.

    Args:
        x: ``[..., d]``.
        logit_pi: ``[..., K]`` unnormalised log weights.
        mu: ``[..., K, d]`` means.
        diag: ``[..., K, d]`` the diagonal of :math:`D_k` (> 0).
        u: ``[..., K, d, r]`` low-rank precision factors, or None for diagonal precisions.

    Returns: ``[...]``. Shapes must agree exactly (no silent broadcasting): a mismatch raises ValueError.
    """
    _check_shapes(logit_pi, mu, diag, u, x)
    log_weights = torch.log_softmax(logit_pi, dim=-1)
    return torch.logsumexp(log_weights + gaussian_log_prob(x, mu, diag, u), dim=-1)


def gmm_sample(
    logit_pi: Tensor,
    mu: Tensor,
    diag: Tensor,
    u: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""One exact sample per batch element, ``[..., d]``.

    Temperature :math:`\tau` divides the logits and multiplies the covariance (noise std by
    :math:`\sqrt\tau`), Ha & Schmidhuber's convention; :math:`\tau = 0` returns the mean of the most likely
    component.
    """
    _check_shapes(logit_pi, mu, diag, u)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    batch, (k, d) = mu.shape[:-2], mu.shape[-2:]
    flat_logits = logit_pi.reshape(-1, k)
    if temperature == 0:
        index = flat_logits.argmax(-1)
    else:
        probs = torch.softmax(flat_logits / temperature, dim=-1)
        index = torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def pick(t: Tensor) -> Tensor:
        flat = t.reshape(-1, k, *t.shape[len(batch) + 1 :])
        return flat[torch.arange(flat.shape[0], device=t.device), index]

    mean, scale = pick(mu), pick(diag).rsqrt()
    if temperature == 0:
        return mean.reshape(*batch, d)
    noise = torch.randn(mean.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    if u is not None and u.shape[-1] > 0:
        factor = pick(u)
        v, chol = _whitened_gram_cholesky(pick(diag), factor)
        eta = torch.randn(
            (*mean.shape[:-1], factor.shape[-1]), generator=generator, device=mu.device, dtype=mu.dtype
        )
        w = noise + (v @ eta.unsqueeze(-1)).squeeze(-1)
        projected = torch.cholesky_solve((v.transpose(-1, -2) @ w.unsqueeze(-1)).double(), chol)
        noise = w - (v @ projected.to(mu.dtype)).squeeze(-1)
    return (mean + math.sqrt(temperature) * scale * noise).reshape(*batch, d)
