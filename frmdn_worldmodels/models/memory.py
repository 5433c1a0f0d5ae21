r"""The memory M: an LSTM whose output parameterises a Gaussian mixture over :math:`f(y_{t+1})`.

At step t it reads :math:`(y_t, c_t)` (latent and action in the world model; previous frame or row and label
in the benchmarks) and outputs K logits, K means, K diagonal precisions :math:`D_k` and K factors :math:`U_k`
(:math:`d \times d'`), so that

.. math::
    \log p(y_{t+1} \mid y_{\le t}, c_{\le t}) = \log \sum_k \pi_k
        N\big(f(y_{t+1}); \mu_k, (D_k + U_k U_k^\top)^{-1}\big)
        + \log\lvert\det \partial f / \partial y_{t+1}\rvert.

``kind="rmdn"`` uses no flow (f = identity), ``rank=0`` diagonal precisions. Optional heads predict the
transition's reward and whether the episode ended with it, so the memory can serve as a dream environment;
with ``heads_read_z`` they read :math:`[h_{t+1}, y_{t+1}]`, the next latent too (``outcome``), so in the dream
they score the frame that was drawn.

The done head is trained on targets spread over the last H steps of an episode (``done_horizon``) with the
positives weighted by w (``done_pos_weight``): its logit is :math:`\ell = \log w + \operatorname{logit}
P(\text{end within } H)`. ``done_probability`` undoes both, giving the per-step hazard
:math:`\lambda = 1 - (1 - \sigma(\ell - \log w + b))^{1/H}` (exact for a constant hazard), which the dream
draws; b recalibrates the head so that its mean chance on the training steps is the data's.

Two regularisers of the dream, both off by default. ``dropout`` p drops the LSTM output before the heads in
training (the LSTM's recurrent state is never dropped; eval mode drops nothing). ``ensemble`` N > 1 puts N
head sets (mixture head, reward head, done head and, for frmdn, the flow) on the one shared LSTM, so every
member reads the h the controller reads. Member m's mixture, reward and done outputs are the rows
``[m * width, (m + 1) * width)``, ``m`` and ``m`` of the three ``nn.Linear`` heads (one matmul serves every
member), its flow is ``flow`` for m = 0 and ``member_flows[m - 1]`` after: one member has exactly the
parameters (names and shapes) of the single memory. The training loss is the mean over the members.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frmdn_worldmodels.models.flows import CouplingFlow
from frmdn_worldmodels.models.mixture import gmm_log_prob, gmm_sample
from frmdn_worldmodels.runtime.config import (
    ConfigError,
    DiagActivation,
    MemoryConfig,
    MemoryKind,
    check_bounds,
)

State = tuple[Tensor, Tensor]


@dataclass
class MemoryOutput:
    """The predicted distribution of the next target, for every batch element (and step)."""

    logit_pi: Tensor
    """[..., K] mixture logits."""
    mu: Tensor
    """[..., K, d] means (in the flow's space for frmdn)."""
    diag: Tensor
    """[..., K, d] diagonal of the precision D_k (> 0)."""
    u: Tensor | None
    """[..., K, d, r] low-rank precision factors, None when rank 0."""
    reward: Tensor | None
    """[...] predicted reward of the transition."""
    done_logit: Tensor | None
    """[...] logit of 'the episode ended with this transition'."""
    hidden: Tensor
    """[..., H] what the heads read (the flow's context): the LSTM output, after dropout in train mode."""
    reward_done: tuple[Tensor, Tensor] | None = None
    """With ``heads_read_z``: the member's reward and done heads' parts that read h, ``([..., 1], [..., 1])``,
    to which ``MemoryModel.outcome`` adds the next latent's part (None: nothing to add)."""
    member: int = 0
    """Which member of the ensemble made these (its flow scores and samples them)."""


@dataclass(frozen=True)
class FusedStep:
    r"""The memory's weights laid out for the dream's fast step (``MemoryModel.fused_step``; copies, the
    memory is untouched). N members of K components, target dim d, rank r, hidden H, cond dim c. The step:

    1. gates :math:`= [z_t, h_t, a_t]` ``@ gate_weight + gate_bias`` (the LSTM's i, f, g, o) give
       :math:`h_{t+1}`;
    2. :math:`h_{t+1}` ``@ small_head_weight + small_head_bias``: member m's K logits, then the parts of its
       reward and done logit that read h, at columns ``[m (K + 2), (m + 1) (K + 2))``;
    3. component j = m K + k only for the dreams that chose it: :math:`h_{t+1}` ``@ component_weight[j] +
       component_bias[j]``, which ``MemoryModel.component_parameters`` turns into its (mean, D, U);
    4. with ``heads_read_z``: :math:`z_{t+1}` ``@ outcome_weight`` adds the parts of member m's reward and
       done that read the drawn latent (columns 2m and 2m + 1).
    """

    gate_weight: Tensor
    """[d + H + c, 4H] the LSTM's input and recurrent weights, rows in the order of the row [z, h, a]."""
    gate_bias: Tensor
    """[4H] the LSTM's two biases summed."""
    small_head_weight: Tensor
    """[H, N (K + 2)] per member: its mixture logits and its reward and done heads' weights on h."""
    small_head_bias: Tensor
    """[N (K + 2)] their biases."""
    outcome_weight: Tensor | None
    """[d, 2N] the reward and done heads' weights on the next latent (None unless ``heads_read_z``)."""
    component_weight: Tensor
    """[N K, H, 2d + d r] per (member, component): the mixture head's weights of its mean, raw diagonal and
    raw low-rank factor."""
    component_bias: Tensor
    """[N K, 2d + d r] their biases."""
    flows: tuple[CouplingFlow | None, ...]
    """[N] each member's flow (the model's own modules, not copies; None for the rmdn)."""


MEMORY_KINDS = typing.get_args(MemoryKind)
DIAG_ACTIVATIONS = typing.get_args(DiagActivation)


def check_memory_config(config: MemoryConfig, section: str = "memory") -> None:
    """Refuse a memory model that cannot be built (``ConfigError`` naming ``<section>.<field>``)."""
    check_bounds(config, section)
    if config.kind not in MEMORY_KINDS:
        raise ConfigError(f"{section}.kind must be 'rmdn' or 'frmdn', got {config.kind!r}")
    if config.diag_activation not in DIAG_ACTIVATIONS:
        raise ConfigError(
            f"{section}.diag_activation must be 'softplus' or 'exp', got {config.diag_activation!r}"
        )
    clamp = config.diag_clamp
    if clamp is not None and (len(clamp) != 2 or not 0 < clamp[0] < clamp[1]):
        raise ConfigError(
            f"{section}.diag_clamp must be null or [low, high] with 0 < low < high, got {clamp}"
        )


class MemoryModel(nn.Module):
    """RMDN / FRMDN memory with low-rank-plus-diagonal precisions (see the module docstring)."""

    def __init__(self, target_dim: int, cond_dim: int, config: MemoryConfig):
        super().__init__()
        check_memory_config(config)
        self.target_dim, self.cond_dim, self.config = target_dim, cond_dim, config
        k, d, r, h, n = config.components, target_dim, config.rank, config.hidden, config.ensemble
        self.lstm = nn.LSTM(target_dim + cond_dim, h, batch_first=True)
        self._sizes = [k, k * d, k * d, k * d * r]
        self._width = sum(self._sizes)
        """One member's outputs of the mixture head."""
        self.mixture_head = nn.Linear(h, n * self._width)
        with torch.no_grad():
            # Start near unit precision and a near-diagonal U, so early steps are well conditioned.
            diag_bias = math.log(math.e - 1) if config.diag_activation == "softplus" else 0.0
            for member in range(n):
                start, end = member * self._width + k + k * d, (member + 1) * self._width
                self.mixture_head.bias[start : start + k * d].fill_(diag_bias)
                self.mixture_head.weight[start + k * d : end].mul_(0.1)
                self.mixture_head.bias[start + k * d : end].zero_()
        head_input = h + (d if config.heads_read_z else 0)
        self.reward_head = nn.Linear(head_input, n) if config.predict_reward else None
        self.done_head = nn.Linear(head_input, n) if config.predict_done else None
        self.done_pos_weight = 1.0
        """w, the positive weight the done head was trained with (``done_probability`` undoes it)."""
        self.done_horizon = 1
        """H: the done head was trained to say 'the episode ends within H steps'."""
        self.done_bias = 0.0
        """b, added to the logit once w is taken out, so that the head's mean chance on the training steps is
        the data's (``stages.train_memory.calibrate_done``): an undertrained head, or one that never saw
        an end, would otherwise end dreams where the game never ends."""

        def new_flow() -> CouplingFlow:
            context = h if config.flow_context else 0
            return CouplingFlow(d, config.flow_blocks, config.flow_hidden, context_dim=context)

        self.flow = new_flow() if config.kind == "frmdn" else None
        """Member 0's flow (None for the rmdn)."""
        self.member_flows = nn.ModuleList(new_flow() for _ in range(n - 1 if config.kind == "frmdn" else 0))
        """The flows of members 1..N-1 (empty with one member)."""
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        """Dropout on the LSTM output before the heads (active in train mode only); None when off."""

    @property
    def ensemble(self) -> int:
        """Members N (head sets on the shared LSTM)."""
        return self.config.ensemble

    def _check_member(self, member: int) -> None:
        if not 0 <= member < self.config.ensemble:
            raise ValueError(f"member must be in [0, {self.config.ensemble}), got {member}")

    def member_flow(self, member: int) -> CouplingFlow | None:
        """Member ``member``'s flow (None for the rmdn)."""
        self._check_member(member)
        return self.flow if member == 0 or self.flow is None else self.member_flows[member - 1]

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero LSTM state (h, c), each ``[1, B, H]``."""
        device = device if device is not None else self.mixture_head.weight.device
        zeros = torch.zeros(
            1, batch_size, self.config.hidden, device=device, dtype=self.mixture_head.weight.dtype
        )
        return zeros, zeros.clone()

    def _features(self, hidden: Tensor) -> Tensor:
        """What the heads read: the LSTM output ``hidden``, dropped out in train mode."""
        return hidden if self.dropout is None else self.dropout(hidden)

    def heads(self, hidden: Tensor, member: int = 0, next_y: Tensor | None = None) -> MemoryOutput:
        """Member ``member``'s outputs on the LSTM output ``hidden`` (dropout first, in train mode);
        ``next_y``: the next latent, which the reward and done heads read with ``heads_read_z``."""
        self._check_member(member)
        features = self._features(hidden)
        if self.config.ensemble == 1:
            raw = self.mixture_head(features)
        else:
            rows = slice(member * self._width, (member + 1) * self._width)
            raw = F.linear(features, self.mixture_head.weight[rows], self.mixture_head.bias[rows])
        return self._output(features, raw, member, next_y)

    def _all_heads(self, hidden: Tensor, next_y: Tensor | None = None) -> list[MemoryOutput]:
        """Every member's outputs on ``hidden``, from one matmul per head (and one dropout mask for all)."""
        features = self._features(hidden)
        raws = self.mixture_head(features).split(self._width, dim=-1)
        return [self._output(features, raw, member, next_y) for member, raw in enumerate(raws)]

    def _scalar_head(self, head: nn.Linear | None, features: Tensor, member: int) -> Tensor | None:
        """Member ``member``'s part of ``head`` that reads h, ``[..., 1]`` (None without the head)."""
        if head is None:
            return None
        one = slice(member, member + 1)
        return F.linear(features, head.weight[one, : features.shape[-1]], head.bias[one])

    def outcome(self, out: MemoryOutput, next_y: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """r_t and the done logit ``[...]`` of the transition whose next latent is ``next_y`` ``[..., d]``
        (read with ``heads_read_z``; ignored without). None where the memory has no such head, or where the
        heads read a latent and none is given."""
        if out.reward_done is None:
            return out.reward, out.done_logit
        if next_y is None:
            return None, None
        parts = []
        for head, part in zip((self.reward_head, self.done_head), out.reward_done):
            if head is None:
                parts.append(None)
                continue
            one = slice(out.member, out.member + 1)
            latent = F.linear(next_y.to(part.dtype), head.weight[one, out.hidden.shape[-1] :])
            parts.append((part + latent).squeeze(-1))
        return parts[0], parts[1]

    def done_probability(self, done_logit: Tensor) -> Tensor:
        r"""The per-step chance the episode ends, from the done head's logit: the positive weight w taken out
        (the weighted loss's optimum is :math:`\log w + \operatorname{logit} p`), the calibration b added, and
        the horizon-H chance turned into the hazard :math:`\lambda = 1 - (1 - p_H)^{1/H}`."""
        shifted = done_logit - math.log(self.done_pos_weight) + self.done_bias
        # log(1 - p_H) = -softplus(logit): stable for any logit
        return -torch.expm1(-F.softplus(shifted) / self.done_horizon)

    def _output(self, hidden: Tensor, raw: Tensor, member: int, next_y: Tensor | None = None) -> MemoryOutput:
        """One member's ``MemoryOutput`` from its raw mixture outputs (its reward and done from the heads,
        reading ``next_y`` too with ``heads_read_z``)."""
        k, d, r = self.config.components, self.target_dim, self.config.rank
        batch = hidden.shape[:-1]
        logit_pi, mu, raw_diag, raw_u = raw.split(self._sizes, dim=-1)
        diag = self.positive_diagonal(raw_diag)
        reward, done = (
            self._scalar_head(head, hidden, member) for head in (self.reward_head, self.done_head)
        )
        reads_z = self.config.heads_read_z and (reward is not None or done is not None)
        out = MemoryOutput(
            logit_pi=logit_pi,
            mu=mu.reshape(*batch, k, d),
            diag=diag.reshape(*batch, k, d),
            # U_k^T is emitted row by row, so the mixture's contractions over d run along a unit stride.
            u=raw_u.reshape(*batch, k, r, d).transpose(-1, -2) if r > 0 else None,
            reward=reward.squeeze(-1) if reward is not None and not reads_z else None,
            done_logit=done.squeeze(-1) if done is not None and not reads_z else None,
            hidden=hidden,
            member=member,
            reward_done=(reward, done) if reads_z else None,
        )
        if reads_z and next_y is not None:
            out.reward, out.done_logit = self.outcome(out, next_y)
        return out

    def positive_diagonal(self, raw: Tensor) -> Tensor:
        r"""The precision's diagonal :math:`D_k` from the head's raw outputs, elementwise: softplus (or exp,
        its input capped at 30), plus ``diag_floor``, then clamped to ``diag_clamp`` if set."""
        config = self.config
        diag = F.softplus(raw) if config.diag_activation == "softplus" else raw.clamp(max=30.0).exp()
        diag = diag + config.diag_floor
        return diag.clamp(*config.diag_clamp) if config.diag_clamp is not None else diag

    def _lstm_input(self, y: Tensor, cond: Tensor | None) -> Tensor:
        if y.shape[-1] != self.target_dim:
            raise ValueError(f"memory expects targets [..., {self.target_dim}], got {tuple(y.shape)}")
        if self.cond_dim == 0:
            if cond is not None and cond.shape[-1] != 0:
                raise ValueError(f"this memory takes no conditioning input, got cond {tuple(cond.shape)}")
            return y
        if cond is None or cond.shape != (*y.shape[:-1], self.cond_dim):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(
                f"memory expects cond [..., {self.cond_dim}] matching y {tuple(y.shape)}, got {got}"
            )
        return torch.cat([y, cond.to(y.dtype)], dim=-1)

    def forward(
        self, inputs: Tensor, cond: Tensor | None = None, state: State | None = None, member: int = 0
    ) -> tuple[MemoryOutput, State]:
        """Read ``inputs`` [B, T, d] (and ``cond`` [B, T, c]); output t is the distribution of y_{t+1} (member
        ``member``'s, with an ensemble)."""
        hidden, state = self.recur(inputs, cond, state)
        return self.heads(hidden, member), state

    def recur(self, y: Tensor, cond: Tensor | None, state: State | None = None) -> tuple[Tensor, State]:
        """The LSTM alone (no heads) reading ``y`` [B, T, d] and ``cond`` [B, T, c] (None without
        conditioning) from ``state`` (h, c), ``[1, B, H]`` each (None = zeros): its outputs h_1..h_T
        ``[B, T, H]`` (what the heads read, before dropout) and the state after the last step."""
        return self.lstm(self._lstm_input(y, cond), state)

    def step(
        self, y: Tensor, cond: Tensor | None, state: State | None, member: int = 0
    ) -> tuple[MemoryOutput, State]:
        """One recurrent step: ``y`` [B, d], ``cond`` [B, c]; returns outputs of batch shape [B] (member
        ``member``'s) and the new state."""
        hidden, state = self.recur(y.unsqueeze(1), None if cond is None else cond.unsqueeze(1), state)
        return self.heads(hidden.squeeze(1), member), state

    def _context(self, out: MemoryOutput) -> Tensor | None:
        return out.hidden if self.config.flow_context else None

    def log_prob(self, target: Tensor, out: MemoryOutput) -> Tensor:
        """log p(target) = log p_GMM(f(target)) + log|det df/dtarget|, shape = the batch shape of ``out``."""
        flow = self.member_flow(out.member)
        if flow is None:
            z, logdet = target, 0.0
        else:
            z, logdet = flow(target, self._context(out))
        return gmm_log_prob(z, out.logit_pi, out.mu, out.diag, out.u) + logdet

    def sample(
        self, out: MemoryOutput, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw y: z from the mixture (tau divides logits, multiplies covariance), then y = f^{-1}(z)."""
        z = gmm_sample(out.logit_pi, out.mu, out.diag, out.u, temperature=temperature, generator=generator)
        flow = self.member_flow(out.member)
        return z if flow is None else flow.inverse(z, self._context(out))

    def member_sequence_log_probs(
        self, y: Tensor, cond: Tensor | None = None, state: State | None = None
    ) -> list[tuple[Tensor, MemoryOutput]]:
        """For each member: per-step log p(y_{t+1} | y_<=t, c_<=t) [B, T] and its outputs, for ``y``
        [B, T+1, d], ``cond`` [B, T, c] (the LSTM reads the sequence once, from ``state``; None = zeros)."""
        return self.read_sequence(y, cond, state)[0]

    def read_sequence(
        self, y: Tensor, cond: Tensor | None, state: State | None
    ) -> tuple[list[tuple[Tensor, MemoryOutput]], State]:
        """``member_sequence_log_probs`` and the LSTM state after the last step."""
        if y.dim() != 3 or y.shape[1] < 2:
            raise ValueError(f"sequence_log_prob expects y [B, T+1, d] with T >= 1, got {tuple(y.shape)}")
        hidden, state = self.recur(y[:, :-1], cond, state)
        return [(self.log_prob(y[:, 1:], out), out) for out in self._all_heads(hidden, y[:, 1:])], state

    def sequence_log_prob(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, MemoryOutput]:
        """Per-step log p(y_{t+1} | y_<=t, c_<=t) for ``y`` [B, T+1, d], ``cond`` [B, T, c] -> ([B, T],
        outputs). With an ensemble: the mean of the members' log p (the NLL reported is the members' mean
        NLL), and member 0's outputs."""
        members = self.member_sequence_log_probs(y, cond)
        if len(members) == 1:
            return members[0]
        return torch.stack([log_prob for log_prob, _ in members]).mean(0), members[0][1]

    def sequence_loss(self, *args, **kwargs) -> dict[str, Tensor]:
        """The losses of ``sequence_loss_and_state`` (same arguments), without the state it ends in."""
        return self.sequence_loss_and_state(*args, **kwargs)[0]

    def sequence_loss_and_state(
        self,
        y: Tensor,
        cond: Tensor | None = None,
        rewards: Tensor | None = None,
        dones: Tensor | None = None,
        mask: Tensor | None = None,
        done_pos_weight: float | None = None,
        reward_weight: float = 1.0,
        done_weight: float = 1.0,
        state: State | None = None,
    ) -> tuple[dict[str, Tensor], State]:
        """Training loss over sequences read from the LSTM state ``state`` (None = zeros): NLL per dimension
        plus the weighted reward (MSE) and done (BCE) losses; and the state after the last step (truncated
        backpropagation through time carries it, detached, to the episode's next window).

        The losses are ``loss``, ``nll`` (mean NLL per step, nats), ``nll_per_dim``, ``reward_loss``,
        ``done_loss``; with an ensemble, each is the mean over the members (every member is trained on the
        same batch)."""
        members, state = self.read_sequence(y, cond, state)
        log_prob = members[0][0]
        weights = torch.ones_like(log_prob) if mask is None else mask.to(log_prob.dtype)
        if weights.shape != log_prob.shape:
            raise ValueError(f"mask must be [B, T] = {tuple(log_prob.shape)}, got {tuple(weights.shape)}")
        count = weights.sum().clamp(min=1.0)
        for name, targets in (("rewards", rewards), ("dones", dones)):
            if targets is not None and targets.shape != log_prob.shape:
                # A [B, T, 1] or [T] target would broadcast against [B, T] predictions into a wrong loss.
                raise ValueError(
                    f"{name} must be [B, T] = {tuple(log_prob.shape)}, got {tuple(targets.shape)}"
                )
        parts = [
            self._member_losses(
                log_prob, out, weights, count, rewards, dones, done_pos_weight, reward_weight, done_weight
            )
            for log_prob, out in members
        ]
        if len(parts) == 1:
            return parts[0], state
        return {key: torch.stack([part[key] for part in parts]).mean() for key in parts[0]}, state

    def _member_losses(
        self,
        log_prob: Tensor,
        out: MemoryOutput,
        weights: Tensor,
        count: Tensor,
        rewards: Tensor | None,
        dones: Tensor | None,
        done_pos_weight: float | None,
        reward_weight: float,
        done_weight: float,
    ) -> dict[str, Tensor]:
        """One member's part of ``sequence_loss``."""
        nll = -(log_prob * weights).sum() / count
        zero = log_prob.new_zeros(())
        reward_loss = done_loss = zero
        if out.reward is not None and rewards is not None:
            reward_loss = ((out.reward - rewards.to(log_prob.dtype)).square() * weights).sum() / count
        if out.done_logit is not None and dones is not None:
            pos_weight = None if not done_pos_weight else log_prob.new_tensor(done_pos_weight)
            bce = F.binary_cross_entropy_with_logits(
                out.done_logit, dones.to(log_prob.dtype), pos_weight=pos_weight, reduction="none"
            )
            done_loss = (bce * weights).sum() / count
        nll_per_dim = nll / self.target_dim
        loss = nll_per_dim + reward_weight * reward_loss + done_weight * done_loss
        return {
            "loss": loss,
            "nll": nll,
            "nll_per_dim": nll_per_dim,
            "reward_loss": reward_loss,
            "done_loss": done_loss,
        }

    def to_checkpoint(self) -> dict:
        """Plain data to rebuild the model (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "state_dict": self.state_dict(),
            "target_dim": self.target_dim,
            "cond_dim": self.cond_dim,
            "config": dataclasses.asdict(self.config),
            "done_pos_weight": self.done_pos_weight,
            "done_horizon": self.done_horizon,
            "done_bias": self.done_bias,
        }

    @classmethod
    def from_checkpoint(cls, payload: dict) -> MemoryModel:
        """The model of ``to_checkpoint`` (a checkpoint from before ``dropout``/``ensemble`` existed loads as
        a single memory without dropout: its parameters have the same names; one from before
        ``heads_read_z`` as heads that read h alone, one without ``done_horizon`` as a horizon of 1)."""
        config = {"heads_read_z": False, **payload["config"]}
        model = cls(payload["target_dim"], payload["cond_dim"], MemoryConfig(**config))
        model.load_state_dict(payload["state_dict"])
        model.done_pos_weight = float(payload.get("done_pos_weight") or 1.0)
        model.done_horizon = int(payload.get("done_horizon", 1))
        model.done_bias = float(payload.get("done_bias", 0.0))
        return model

    def member_model(self, member: int) -> MemoryModel:
        """Member ``member`` alone: a one-member memory (copies of the shared LSTM and of that member's heads
        and flow; the same dropout), on this model's device and dtype. The global RNG is left alone."""
        self._check_member(member)
        with torch.random.fork_rng(devices=[]):
            single = MemoryModel(self.target_dim, self.cond_dim, dataclasses.replace(self.config, ensemble=1))
        single = single.to(self.mixture_head.weight).train(self.training)
        single.done_pos_weight, single.done_horizon = self.done_pos_weight, self.done_horizon
        single.done_bias = self.done_bias
        rows = slice(member * self._width, (member + 1) * self._width)
        state = dict(self.lstm.state_dict(prefix="lstm."))
        state |= {
            "mixture_head.weight": self.mixture_head.weight[rows],
            "mixture_head.bias": self.mixture_head.bias[rows],
        }
        for name in ("reward_head", "done_head"):
            head = getattr(self, name)
            if head is not None:
                state |= {
                    f"{name}.weight": head.weight[member : member + 1],
                    f"{name}.bias": head.bias[member : member + 1],
                }
        flow = self.member_flow(member)
        if flow is not None:
            state |= flow.state_dict(prefix="flow.")
        single.load_state_dict(state)
        return single

    @torch.no_grad()
    def fused_step(self) -> FusedStep:
        """This memory's weights laid out for the dream's fast step (``FusedStep``: the step, the shapes)."""
        if self.reward_head is None or self.done_head is None:
            raise ValueError(
                "the dream needs a memory with reward and done heads (memory.predict_reward/predict_done)"
            )
        k, n, width, hidden = self.config.components, self.ensemble, self._width, self.config.hidden
        lstm, z_dim = self.lstm, self.target_dim
        # the step's input row is laid out [z, h, a], so the controller reads its first Z + H columns in place
        fused = torch.cat(
            [lstm.weight_ih_l0[:, :z_dim], lstm.weight_hh_l0, lstm.weight_ih_l0[:, z_dim:]], dim=1
        )
        head_w, head_b = self.mixture_head.weight, self.mixture_head.bias
        reward, done = self.reward_head, self.done_head
        # logits, and the parts of reward and done that read h (of every member), from one small matmul
        logit_rows = torch.cat([torch.arange(m * width, m * width + k) for m in range(n)])
        scalar_h = [reward.weight[:, None, :hidden], done.weight[:, None, :hidden]]
        small_weight = (
            torch.cat([head_w[logit_rows].reshape(n, k, -1), *scalar_h], 1)
            .reshape(n * (k + 2), -1)
            .T.contiguous()
        )
        small_bias = torch.cat(
            [head_b[logit_rows].reshape(n, k), reward.bias[:, None], done.bias[:, None]], 1
        ).reshape(-1)
        outcome_weight = (
            torch.stack([reward.weight[:, hidden:], done.weight[:, hidden:]], 1)
            .reshape(2 * n, -1)
            .T.contiguous()
            if self.config.heads_read_z
            else None
        )
        rows = [self._component_rows(m, j) for m in range(n) for j in range(k)]
        return FusedStep(
            gate_weight=fused.T.contiguous(),
            gate_bias=(lstm.bias_ih_l0 + lstm.bias_hh_l0).clone(),
            small_head_weight=small_weight,
            small_head_bias=small_bias,
            outcome_weight=outcome_weight,
            component_weight=torch.stack([head_w[index].T for index in rows]).contiguous(),
            component_bias=torch.stack([head_b[index] for index in rows]),
            flows=tuple(self.member_flow(m) for m in range(n)),
        )

    def _component_rows(self, member: int, component: int) -> Tensor:
        """The mixture head's rows of member ``member``'s component ``component``: its mean, its raw diagonal
        and its raw low-rank factor (``2d + d r`` rows)."""
        k, d, r, j = self.config.components, self.target_dim, self.config.rank, component
        return member * self._width + torch.cat(
            [
                torch.arange(k + j * d, k + (j + 1) * d),
                torch.arange(k + k * d + j * d, k + k * d + (j + 1) * d),
                torch.arange(k + 2 * k * d + j * d * r, k + 2 * k * d + (j + 1) * d * r),
            ]
        )

    def component_parameters(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """One component's mean ``[B, d]``, diagonal D ``[B, d]`` and factor U ``[B, d, r]`` (None when rank
        0) from its raw outputs ``[B, 2d + d r]`` (``FusedStep.component_weight``), as ``_heads`` makes
        them."""
        d, r = self.target_dim, self.config.rank
        mu, raw_diag, raw_u = raw.split([d, d, d * r], dim=1)
        # U_k^T is emitted row by row (the layout of _output)
        return (
            mu,
            self.positive_diagonal(raw_diag),
            raw_u.reshape(-1, r, d).transpose(1, 2) if r > 0 else None,
        )
