r"""Affine coupling flows (RealNVP; FRMDN paper section 3.2), optionally conditioned on a context vector.

One block splits :math:`y = (y_a, y_b)` and maps

.. math::
    z_a = y_a, \qquad z_b = y_b \odot \exp(s(y_a, c)) + t(y_a, c), \qquad
    \log\lvert\det \partial z / \partial y\rvert = \textstyle\sum_i s_i(y_a, c),

with :math:`s` a two-layer MLP (LeakyReLU, then Tanh) and :math:`t` the same without the final Tanh. Blocks
alternate which half is transformed. The last layers start at zero, so a new flow is the identity. The context
:math:`c` (e.g. the RNN state, the paper's Fig. 6 extension) enters both networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AffineCoupling(nn.Module):
    """One affine coupling block: coordinates ``[:split]`` condition ``[split:]``, or the reverse if
    ``flip``."""

    def __init__(self, dim: int, split: int, flip: bool, hidden: int, context_dim: int = 0):
        super().__init__()
        self.split, self.flip = split, flip
        kept, moved = (dim - split, split) if flip else (split, dim - split)
        inputs = kept + context_dim
        self.scale = nn.Sequential(
            nn.Linear(inputs, hidden), nn.LeakyReLU(), nn.Linear(hidden, moved), nn.Tanh()
        )
        self.shift = nn.Sequential(nn.Linear(inputs, hidden), nn.LeakyReLU(), nn.Linear(hidden, moved))
        for last in (self.scale[2], self.shift[2]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _halves(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(kept, moved) halves of ``y``."""
        first, second = y[..., : self.split], y[..., self.split :]
        return (second, first) if self.flip else (first, second)

    def _join(self, kept: Tensor, moved: Tensor) -> Tensor:
        return torch.cat([moved, kept] if self.flip else [kept, moved], dim=-1)

    def _scale_shift(self, kept: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        features = kept if context is None else torch.cat([kept, context], dim=-1)
        # s and t read the same features: their first layers run as one matmul (the parameters stay two
        # nn.Linear, so checkpoints keep their names).
        first_s, first_t = self.scale[0], self.shift[0]
        hidden = F.linear(
            features, torch.cat([first_s.weight, first_t.weight]), torch.cat([first_s.bias, first_t.bias])
        )
        hidden_s, hidden_t = hidden.split(first_s.out_features, dim=-1)
        log_scale = self.scale[3](self.scale[2](self.scale[1](hidden_s)))
        return log_scale, self.shift[2](self.shift[1](hidden_t))

    def forward(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept, moved = self._halves(y)
        log_scale, shift = self._scale_shift(kept, context)
        return self._join(kept, moved * log_scale.exp() + shift), log_scale.sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        kept, moved = self._halves(z)
        log_scale, shift = self._scale_shift(kept, context)
        return self._join(kept, (moved - shift) * (-log_scale).exp())


class CouplingFlow(nn.Module):
    r"""A stack of affine coupling blocks with alternating halves: :math:`z = f(y)`.

    Args:
        dim: dimension d of y (>= 2).
        blocks: number of coupling blocks.
        hidden: hidden width of each block's s and t networks.
        context_dim: size of the optional context vector (0 = unconditional).
    """

    def __init__(self, dim: int, blocks: int = 2, hidden: int = 64, context_dim: int = 0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling flow needs dim >= 2 to split the input, got dim={dim}")
        if blocks < 1:
            raise ValueError(f"a coupling flow needs at least one block, got blocks={blocks}")
        self.dim, self.context_dim = dim, context_dim
        self.blocks = nn.ModuleList(
            AffineCoupling(dim, dim // 2, flip=i % 2 == 1, hidden=hidden, context_dim=context_dim)
            for i in range(blocks)
        )

    def _check(self, y: Tensor, context: Tensor | None) -> None:
        if y.shape[-1] != self.dim:
            raise ValueError(f"flow of dim {self.dim} got input of shape {tuple(y.shape)}")
        if self.context_dim and (context is None or context.shape != (*y.shape[:-1], self.context_dim)):
            got = None if context is None else tuple(context.shape)
            raise ValueError(
                f"flow expects context [..., {self.context_dim}] matching input {tuple(y.shape)}, got {got}"
            )
        if not self.context_dim and context is not None:
            raise ValueError("this flow has no context input (context_dim=0) but a context was given")

    def forward(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``z = f(y)`` and ``log|det dz/dy|`` per sample (shape ``y.shape[:-1]``)."""
        self._check(y, context)
        logdet = y.new_zeros(y.shape[:-1])
        for block in self.blocks:
            y, block_logdet = block(y, context)
            logdet = logdet + block_logdet
        return y, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Returns ``y = f^{-1}(z)``."""
        self._check(z, context)
        for block in reversed(self.blocks):
            z = block.inverse(z, context)
        return z
