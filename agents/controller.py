r"""C: the linear controller of World Models, :math:`a_t = g(W [z_t, h_t] + b)`.

``W`` is ``[A, Z + H]`` and ``b`` is ``[A]``; CMA-ES searches the flat vector ``[W.flatten(), b]``. The
squashing ``g`` depends on the game:

- continuous (CarRacing, ``A = 3``): steering :math:`\tanh(x_0) \in [-1, 1]`, gas
  :math:`(\tanh(x_1) + 1) / 2 \in [0, 1]` and brake :math:`\max(\tanh(x_2), 0) \in [0, 1]` (World Models);
- discrete (Mario, ``A`` button combinations): :math:`\arg\max_i x_i`.

Every method works on one parameter vector ``[n]`` or on a whole population ``[P, n]`` at once (the batched
dream steps P candidates x R rollouts in one tensor program).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LinearController:
    """The shape of a linear controller; the parameters themselves are a flat tensor passed to each call."""

    z_dim: int
    """Size of the VAE latent z."""
    h_dim: int
    """Size of the memory's hidden state h."""
    action_dim: int
    """A: 3 for CarRacing, the number of discrete actions for Mario."""
    discrete: bool
    """argmax over A logits (Mario) instead of squashed continuous actions (CarRacing)."""

    def __post_init__(self):
        if min(self.z_dim, self.action_dim) < 1 or self.h_dim < 0:
            raise ValueError(f"controller needs z_dim >= 1, h_dim >= 0, action_dim >= 1, got {self}")
        if not self.discrete and self.action_dim != 3:
            raise ValueError(
                f"a continuous controller drives CarRacing's 3 actions, got action_dim={self.action_dim}"
            )

    @property
    def in_dim(self) -> int:
        return self.z_dim + self.h_dim

    @property
    def num_params(self) -> int:
        """(Z + H) * A weights plus A biases."""
        return (self.in_dim + 1) * self.action_dim

    def to_dict(self) -> dict:
        return asdict(self)

    def split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Flat ``[..., n]`` -> (W ``[..., A, Z + H]``, b ``[..., A]``) as views."""
        if params.shape[-1] != self.num_params:
            raise ValueError(
                f"controller expects {self.num_params} parameters, got shape {tuple(params.shape)}"
            )
        weights = params[..., : self.in_dim * self.action_dim]
        return weights.unflatten(-1, (self.action_dim, self.in_dim)), params[
            ..., self.in_dim * self.action_dim :
        ]

    def join(self, weight: Tensor, bias: Tensor) -> Tensor:
        """The inverse of ``split``: (W ``[..., A, Z + H]``, b ``[..., A]``) -> ``[..., n]``."""
        return torch.cat([weight.flatten(-2), bias], dim=-1)

    def logits(self, params: Tensor, features: Tensor) -> Tensor:
        """``W x + b`` for features x = [z, h].

        ``params [n]`` with ``features [..., Z + H]`` -> ``[..., A]``; or a population ``params [P, n]`` with
        ``features [P, R, Z + H]`` (R rollouts per candidate) -> ``[P, R, A]``.
        """
        weight, bias = self.split(params)
        if features.shape[-1] != self.in_dim:
            raise ValueError(
                f"controller expects features [..., {self.in_dim}] = [z, h], got {tuple(features.shape)}"
            )
        if params.dim() == 1:
            return torch.addmm(bias, features.reshape(-1, self.in_dim), weight.T).reshape(
                *features.shape[:-1], -1
            )
        if params.dim() != 2 or features.dim() != 3 or features.shape[0] != params.shape[0]:
            raise ValueError(
                f"a population's params [P, n] need features [P, R, {self.in_dim}], "
                f"got params {tuple(params.shape)} and features {tuple(features.shape)}"
            )
        return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))

    def squash(self, logits: Tensor) -> Tensor:
        """Logits ``[..., A]`` -> env actions: ``[..., 3]`` in the CarRacing box, or ``[...]`` int64
        indices."""
        if self.discrete:
            return logits.argmax(-1)
        squashed = torch.tanh(logits)
        # World Models' mapping (and the exploration policy's): brake = max(tanh, 0), so a fresh controller
        # does not hold the brake at 0.5 and "no brake" is reachable, as in the collected data
        gas = (squashed[..., 1:2] + 1.0) * 0.5
        return torch.cat([squashed[..., :1], gas, squashed[..., 2:].clamp(min=0.0)], dim=-1)

    def act(self, params: Tensor, z: Tensor, h: Tensor) -> Tensor:
        """The env action for latent ``z`` and memory state ``h`` (shapes as in ``logits``, split in two)."""
        return self.squash(self.logits(params, torch.cat([z, h], dim=-1)))

    def encode(self, action: Tensor) -> Tensor:
        """Env actions -> the float vectors the memory reads (``rollouts.envs.encode_action``, batched):
        the action itself for CarRacing, one-hot for Mario."""
        if self.discrete:
            return torch.nn.functional.one_hot(action, self.action_dim).float()
        return action

    def initial_params(self, generator: torch.Generator | None = None, scale: float = 0.0) -> Tensor:
        """A starting point for CMA-ES: zeros (``scale=0``), or N(0, scale^2) entries."""
        if scale == 0.0:
            return torch.zeros(self.num_params)
        return scale * torch.randn(self.num_params, generator=generator)
