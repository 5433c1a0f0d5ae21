r"""C: the controller of World Models, :math:`a_t = g(W [z_t, h_t] + b)` (``hidden = 0``, the linear
controller), or Ha's variant with one hidden layer of N tanh units (``hidden = N``):
:math:`a_t = g(W_2 \tanh(W_1 [z_t, h_t] + b_1) + b_2)`.

Linear: ``W`` is ``[A, Z + H]`` and ``b`` is ``[A]``; CMA-ES searches the flat vector ``[W.flatten(), b]``.
Hidden layer: ``W1 [N, Z + H]``, ``b1 [N]``, ``W2 [A, N]``, ``b2 [A]``, flat as
``[W1.flatten(), b1, W2.flatten(), b2]``. The squashing ``g`` depends on the game:

- continuous (CarRacing, ``A = 3``): steering :math:`\tanh(x_0) \in [-1, 1]`, gas
  :math:`(\tanh(x_1) + 1) / 2 \in [0, 1]` and brake :math:`\max(\tanh(x_2), 0) \in [0, 1]` (World Models);
- discrete (Mario, ``A`` button combinations): :math:`\arg\max_i x_i`; or, with ``sample``, a draw from
  :math:`\mathrm{softmax}(x)`, the inverse of its CDF at a uniform :math:`u` the caller draws (a seeded
  generator per episode or per dream batch, so an episode depends on its seed alone).

Every method works on one parameter vector ``[n]`` or on a whole population ``[P, n]`` at once (the batched
dream steps P candidates x R rollouts in one tensor program: one batched matmul per layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Controller:
    """The shape of a controller; the parameters themselves are a flat tensor passed to each call."""

    z_dim: int
    """Size of the VAE latent z."""
    h_dim: int
    """Size of the memory's hidden state h."""
    action_dim: int
    """A: 3 for CarRacing, the number of discrete actions for Mario."""
    discrete: bool
    """argmax over A logits (Mario) instead of squashed continuous actions (CarRacing)."""
    hidden: int = 0
    """N tanh units of a hidden layer (``controller.hidden``); 0 = the linear controller of World Models."""
    sample: bool = False
    """Draw a discrete action from softmax of the logits (``controller.policy: sample``) instead of argmax."""

    def __post_init__(self):
        if min(self.z_dim, self.action_dim) < 1 or min(self.h_dim, self.hidden) < 0:
            raise ValueError(
                f"controller needs z_dim >= 1, h_dim >= 0, action_dim >= 1, hidden >= 0, got {self}"
            )
        if not self.discrete and self.action_dim != 3:
            raise ValueError(
                f"a continuous controller drives CarRacing's 3 actions, got action_dim={self.action_dim}"
            )
        if self.sample and not self.discrete:
            raise ValueError("controller.policy: sample draws discrete actions; this game's are continuous")

    @property
    def in_dim(self) -> int:
        return self.z_dim + self.h_dim

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes of the parts of the flat vector, in its order: (W, b), or (W1, b1, W2, b2)."""
        if self.hidden == 0:
            return (self.action_dim, self.in_dim), (self.action_dim,)
        return (self.hidden, self.in_dim), (self.hidden,), (self.action_dim, self.hidden), (self.action_dim,)

    @property
    def num_params(self) -> int:
        """Linear: (Z + H) * A weights plus A biases; hidden layer of N: (Z + H + 1) * N + (N + 1) * A."""
        return sum(math.prod(shape) for shape in self.shapes)

    def to_dict(self) -> dict:
        return asdict(self)

    def split(self, params: Tensor) -> tuple[Tensor, ...]:
        """Flat ``[..., n]`` -> views (W ``[..., A, Z + H]``, b ``[..., A]``), or with a hidden layer
        (W1 ``[..., N, Z + H]``, b1 ``[..., N]``, W2 ``[..., A, N]``, b2 ``[..., A]``)."""
        if params.shape[-1] != self.num_params:
            raise ValueError(
                f"controller expects {self.num_params} parameters, got shape {tuple(params.shape)}"
            )
        parts, start = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            part = params[..., start : start + size]
            parts.append(part.unflatten(-1, shape) if len(shape) == 2 else part)
            start += size
        return tuple(parts)

    def join(self, *parts: Tensor) -> Tensor:
        """The inverse of ``split``: (W, b) or (W1, b1, W2, b2), leading dims ``[...]``, -> ``[..., n]``."""
        if len(parts) != len(self.shapes):
            raise ValueError(f"controller joins {len(self.shapes)} parts, got {len(parts)}")
        return torch.cat(
            [
                part.flatten(-2) if len(shape) == 2 else part
                for part, shape in zip(parts, self.shapes, strict=True)
            ],
            dim=-1,
        )

    def logits(self, params: Tensor, features: Tensor) -> Tensor:
        """``W x + b`` (or ``W2 tanh(W1 x + b1) + b2``) for features x = [z, h].

        ``params [n]`` with ``features [..., Z + H]`` -> ``[..., A]``; or a population ``params [P, n]`` with
        ``features [P, R, Z + H]`` (R rollouts per candidate) -> ``[P, R, A]``: one batched matmul per layer,
        no loop over candidates.
        """
        parts = self.split(params)
        if features.shape[-1] != self.in_dim:
            raise ValueError(
                f"controller expects features [..., {self.in_dim}] = [z, h], got {tuple(features.shape)}"
            )
        layers = list(zip(parts[::2], parts[1::2], strict=True))
        if params.dim() == 1:
            x = features.reshape(-1, self.in_dim)
            for index, (weight, bias) in enumerate(layers):
                x = torch.addmm(bias, torch.tanh(x) if index else x, weight.T)
            return x.reshape(*features.shape[:-1], -1)
        if params.dim() != 2 or features.dim() != 3 or features.shape[0] != params.shape[0]:
            raise ValueError(
                f"a population's params [P, n] need features [P, R, {self.in_dim}], "
                f"got params {tuple(params.shape)} and features {tuple(features.shape)}"
            )
        x = features
        for index, (weight, bias) in enumerate(layers):
            x = torch.baddbmm(bias.unsqueeze(1), torch.tanh(x) if index else x, weight.transpose(1, 2))
        return x

    def squash(self, logits: Tensor, uniforms: Tensor | None = None) -> Tensor:
        r"""Logits ``[..., A]`` -> env actions: ``[..., 3]`` in the CarRacing box, or ``[...]`` int64
        indices; with ``sample``, ``uniforms [...]`` in [0, 1) pick each index by the CDF of softmax(logits):
        the first i with :math:`\sum_{j \le i} p_j > u`."""
        if self.sample:
            if uniforms is None or uniforms.shape != logits.shape[:-1]:
                raise ValueError(
                    f"a sampling controller needs one uniform per action {tuple(logits.shape[:-1])}, got "
                    f"{None if uniforms is None else tuple(uniforms.shape)}"
                )
            cdf = torch.softmax(logits, dim=-1).cumsum(-1)
            below = (cdf <= uniforms.unsqueeze(-1).to(cdf)).sum(-1)
            return below.clamp(max=self.action_dim - 1)  # u at the CDF's last rounding
        if self.discrete:
            return logits.argmax(-1)
        squashed = torch.tanh(logits)
        # World Models' mapping (and the exploration policy's): brake = max(tanh, 0), so a fresh controller
        # does not hold the brake at 0.5 and "no brake" is reachable, as in the collected data
        gas = (squashed[..., 1:2] + 1.0) * 0.5
        return torch.cat([squashed[..., :1], gas, squashed[..., 2:].clamp(min=0.0)], dim=-1)

    def act(self, params: Tensor, z: Tensor, h: Tensor, uniforms: Tensor | None = None) -> Tensor:
        """The env action for latent ``z`` and memory state ``h`` (shapes as in ``logits``, split in two;
        ``uniforms`` as in ``squash``)."""
        return self.squash(self.logits(params, torch.cat([z, h], dim=-1)), uniforms)

    def uniforms(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor | None:
        """What ``squash`` needs for ``shape`` actions from ``generator``: uniforms with ``sample``, else None
        (and the generator is not drawn from, so an argmax controller's dreams stay as they were)."""
        if not self.sample:
            return None
        return torch.rand(shape, generator=generator, device=None if generator is None else generator.device)

    def encode(self, action: Tensor) -> Tensor:
        """Env actions -> the float vectors the memory reads (``games.envs.encode_action``, batched):
        the action itself for CarRacing, one-hot for Mario."""
        if self.discrete:
            return torch.nn.functional.one_hot(action, self.action_dim).float()
        return action

    def initial_params(self, generator: torch.Generator | None = None, scale: float = 0.0) -> Tensor:
        """A starting point for CMA-ES: N(0, scale^2) entries with ``scale > 0``; else zeros (the linear
        controller: the action g(0) for every input), except, with a hidden layer, W1 ~ N(0, 1 / (Z + H))
        drawn from ``generator`` (None: a generator seeded with 0; never the global one).

        Why W1 is random: with W1 = 0 every hidden unit of the mean CMA-ES starts from is the same constant
        tanh(0) = 0 (a dead, symmetric layer), and a candidate's actions depend on [z, h] only through its
        perturbations of W1 and W2 together (second order in sigma). A random W1 gives N
        distinct features of the input at once; its 1 / sqrt(Z + H) scale keeps tanh in its near-linear range
        for inputs of unit size (z ~ N(0, 1), h in [-1, 1]). W2 = 0 still makes the first action g(b2) = g(0),
        as for the linear controller.
        """
        if scale != 0.0:
            return scale * torch.randn(self.num_params, generator=generator)
        params = torch.zeros(self.num_params)
        if self.hidden:
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            w1 = self.split(params)[0]
            w1.copy_(torch.randn(w1.shape, generator=generator) / math.sqrt(self.in_dim))
        return params
