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


UNROLLED_MAX_RANK = 8
"""Up to this rank the r x r Gram matrix and its Cholesky factor are unrolled over the batch, entry by entry:
a batched matmul or LAPACK call pays a per-matrix overhead that dominates the thousands of tiny matrices a
training batch holds (forward and backward)."""


def _cholesky(gram: list[list[Tensor]]) -> list[list[Tensor]]:
    """Lower Cholesky factor of M = I + G from the lower triangle ``gram[i][j]`` (j <= i) of G (positive
    semi-definite), both as nested lists of batch tensors. Every pivot of I + G is >= 1, so clamping at 1 only
    removes rounding error."""
    rank = len(gram)
    lower: list[list[Tensor]] = [[] for _ in range(rank)]
    for j in range(rank):
        pivot = 1.0 + gram[j][j]
        for k in range(j):
            pivot = pivot - lower[j][k].square()
        lower[j].append(pivot.clamp_min(1.0).sqrt())
        for i in range(j + 1, rank):
            entry = gram[i][j]
            for k in range(j):
                entry = entry - lower[i][k] * lower[j][k]
            lower[i].append(entry / lower[j][j])
    return lower


def _cholesky_solve(lower: list[list[Tensor]], rhs: Tensor) -> Tensor:
    """Solve (L L^T) x = rhs for rhs ``[..., r]`` by forward and back substitution over the batch."""
    rank = len(lower)
    forward: list[Tensor] = []
    for i in range(rank):
        value = rhs[..., i]
        for k in range(i):
            value = value - lower[i][k] * forward[k]
        forward.append(value / lower[i][i])
    solution: list[Tensor] = [rhs[..., 0]] * rank
    for i in reversed(range(rank)):
        value = forward[i]
        for k in range(i + 1, rank):
            value = value - lower[k][i] * solution[k]
        solution[i] = value / lower[i][i]
    return torch.stack(solution, dim=-1)


def _capacitance_cholesky(diag: Tensor, u: Tensor) -> tuple[tuple[Tensor, ...], list[list[Tensor]]]:
    """The columns of U (r views ``[..., d]``; unit stride along d when ``u`` is a transposed
    ``[..., r, d]`` tensor, as ``MemoryOutput`` holds it) and the lower Cholesky factor, as nested lists of
    float64 batch tensors, of M = I + V^T V = I + U^T D^{-1} U, for ``diag`` ``[..., d]`` and ``u``
    ``[..., d, r]``.

    The Gram entries are formed in U's dtype (rounding them perturbs M no more than the rounding of U itself
    already does), one product and sum over d per entry of the lower triangle; the factorisation runs in
    float64. Up to ``UNROLLED_MAX_RANK`` its pivots are clamped at their lower bound 1, so extreme parameters
    give finite values and gradients rather than a failed factorisation; above it LAPACK's Cholesky can still
    fail on a numerically singular M."""
    rank = u.shape[-1]
    u_t = u.transpose(-1, -2)
    # One unbind serves every product (its backward is one stack).
    columns = u_t.unbind(-2)
    if rank > UNROLLED_MAX_RANK:
        v_t = u_t * diag.rsqrt().unsqueeze(-2)
        gram = (v_t @ v_t.transpose(-1, -2)).double()
        factor = torch.linalg.cholesky(gram + torch.eye(rank, dtype=gram.dtype, device=gram.device))
        return columns, [[factor[..., i, j] for j in range(i + 1)] for i in range(rank)]
    scaled = [column / diag for column in columns]
    gram = [[(scaled[i] * columns[j]).sum(-1).double() for j in range(i + 1)] for i in range(rank)]
    return columns, _cholesky(gram)


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
        # Column by column rather than one broadcast product over [..., K, r, d]: the broadcast's backward
        # reduces over a strided axis, several times slower on the CPU than these r products over d.
        columns, lower = _capacitance_cholesky(diag, u)
        for column in columns:
            mahalanobis = mahalanobis + (column * b).sum(-1).square()
        log_det = log_det + 2 * sum(lower[j][j].log() for j in range(len(lower))).to(x.dtype)
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
    if k == 1:
        index = None  # one component: nothing to choose (callers that pre-select a component rely on this)
    elif temperature == 0:
        index = flat_logits.argmax(-1)
    else:
        probs = torch.softmax(flat_logits / temperature, dim=-1)
        index = torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def pick(t: Tensor) -> Tensor:
        flat = t.reshape(-1, k, *t.shape[len(batch) + 1 :])
        return flat[:, 0] if index is None else flat[torch.arange(flat.shape[0], device=t.device), index]

    mean, chosen_diag = pick(mu), pick(diag)
    scale = chosen_diag.rsqrt()
    if temperature == 0:
        return mean.reshape(*batch, d)
    noise = torch.randn(mean.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    if u is not None and u.shape[-1] > 0:
        factor = pick(u)
        v_t = factor.transpose(-1, -2) * scale.unsqueeze(-2)
        _, lower = _capacitance_cholesky(chosen_diag, factor)
        eta = torch.randn(
            (*mean.shape[:-1], factor.shape[-1]), generator=generator, device=mu.device, dtype=mu.dtype
        )
        w = noise + (eta.unsqueeze(-1) * v_t).sum(-2)
        projected = _cholesky_solve(lower, (v_t * w.unsqueeze(-2)).sum(-1).double())
        noise = w - (projected.to(mu.dtype).unsqueeze(-1) * v_t).sum(-2)
    return (mean + math.sqrt(temperature) * scale * noise).reshape(*batch, d)
