r"""The dream's one step, shared by both dreams: the gymnasium env (``dream.env.DreamEnv``, one
dream, what the dream video shows) and the batched dream CMA-ES trains on
(``frmdn_worldmodels.dream.batched.BatchedDream``, B = P candidates x R rollouts).

B dreams advance together in a ``DreamBatch``; the driver writes each dream's action :math:`a_t` into it and
calls ``DreamDynamics.step``. Per step, with :math:`h_t` the LSTM output *before* reading :math:`(z_t, a_t)`:

1. the LSTM reads :math:`(z_t, a_t)` from :math:`(h_t, c_t)`: one fused ``[z, h, a] @ W`` for all four gates;
2. its output :math:`h_{t+1}` gives the mixture logits and the parts of :math:`r_t` and the done logit
   :math:`\ell_t` that read h (one small matmul); a component :math:`k \sim \text{softmax}(\text{logits} /
   \tau)` (the argmax at :math:`\tau = 0`); then *only the chosen component's* mean, diagonal and low-rank
   factor are computed (one matmul per component over the dreams that chose it, about K times fewer flops than
   the full head), and :math:`z_{t+1}` is drawn from it with the project's sampler (``gmm_sample``: covariance
   times :math:`\tau`) and mapped through the inverse flow; with ``memory.heads_read_z`` the reward and done
   heads then add their part that reads the drawn :math:`z_{t+1}`, so they score the frame the dream shows;
3. :math:`done_t \sim \text{Bernoulli}(\lambda_t)`, :math:`\lambda_t` the head's per-step hazard
   (``MemoryModel.done_probability``: the loss's positive weight and the done horizon taken out); the
   temperature leaves it alone, and :math:`\tau = 0` ends a dream iff :math:`\lambda_t > 1/2` (Ha's rule).
   A dream that ended is masked, not removed (the tensors keep their shape): it collects no more reward or
   steps. With critics (``dream.pessimism``), r_t is paid less their disagreement about z_{t+1}. Each dream
   stops at the horizon, and a dream started at step t of a real episode at the steps the real game had left
   from there (``steps_left``).

That is the law of ``MemoryModel.step`` followed by ``MemoryModel.sample`` (the tests pin the two together).
The memory lays out its own weights for this step (``MemoryModel.fused_step``, a ``models.memory.FusedStep``)
and turns a chosen component's raw outputs into its mean, D and U (``MemoryModel.component_parameters``): the
dream knows nothing of the memory's head rows.

A dream starts (``DreamDynamics.start``) at a real frame: an index :math:`s` uniform over the N start frames,
:math:`z_0 = \mu_s + \exp(\log\sigma^2_s / 2)\,\epsilon` (:math:`\mu_s` with ``use_mu``, as the memory was
trained), and the memory's LSTM state there (zeros at first frames; ``dream.env.warm_starts`` for any
frame).

Every draw comes from one ``torch.Generator``, in a fixed order (start indices, the z_0 noise, the dropout
mask, the ensemble members; then per step: components, z noise, low-rank noise, dones), so one generator seed
gives the same dream of batch 1 in both drivers. (The batched driver draws a sampling controller's actions,
``controller.policy: sample``, from the same generator before each step.)

Variations fixed per dream belong in ``DreamBatch``: drawn by ``start``, carried to every candidate by
``DreamBatch.repeat`` (candidates are compared on the same dreams), applied by ``step``. Two exist, each off
by default (and then drawing nothing and costing nothing):

- ``memory.dropout`` p > 0 (Dropout's Dream Land): one mask per dream, ``Bernoulli(1 - p) / (1 - p)`` per
  unit of h, multiplies the LSTM output the heads (and the flow's context) read at every step of that dream,
  a family of slightly different dreams. The controller still reads the undropped h_t, as in the real game,
  and the LSTM's recurrent state is never dropped.
- ``memory.ensemble`` N > 1: each dream runs in one member (head set on the shared LSTM), fixed for the
  dream. Each dream's member is uniform over the N, and the B dreams of a start are balanced over them (a
  random rotation of ``0, 1, ..., N-1, 0, 1, ...`` in random order), so every member is used whenever
  B >= N. The step's heads are fused per member; the chosen-component matmuls group the dreams by (member,
  component) and the inverse flow by member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from frmdn_worldmodels.models.memory import MemoryModel, State
from frmdn_worldmodels.models.mixture import gmm_sample
from frmdn_worldmodels.models.vae import posterior_sample

if TYPE_CHECKING:
    from frmdn_worldmodels.dream.pessimism import Pessimism

LSTMState = tuple[np.ndarray, np.ndarray]
"""(h, c), ``[N, H]`` each: the memory's LSTM state at N start frames."""


@dataclass
class DreamStarts:
    """Real frames dreams start from."""

    mu: np.ndarray
    """[N, Z] the frames' posterior means."""
    logvar: np.ndarray
    """[N, Z] their log-variances."""
    state: LSTMState | None
    """The memory's (h, c) at each frame; None: zeros (first frames)."""
    times: np.ndarray
    """[N] the step of its real episode each frame is at (0 for first frames)."""


def start_state_tensors(
    initial_state: LSTMState | None, count: int, hidden: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """Validate the (h, c) ``[count, hidden]`` of ``count`` start frames and put them on ``device`` (None
    stays None)."""
    if initial_state is None:
        return None
    parts = tuple(torch.as_tensor(np.asarray(part), dtype=dtype, device=device) for part in initial_state)
    if len(parts) != 2 or any(part.shape != (count, hidden) for part in parts):
        raise ValueError(
            f"initial_state must be (h, c) of shape [{count}, {hidden}] each, got "
            f"{[tuple(part.shape) for part in parts]}"
        )
    return parts


def dream_done(probability: Tensor, threshold: bool, generator: torch.Generator | None) -> Tensor:
    """done ~ Bernoulli(probability) as bools; ``threshold``: probability > 1/2 instead (draws nothing)."""
    if threshold:
        return probability > 0.5
    uniform = torch.rand(
        probability.shape, generator=generator, device=probability.device, dtype=probability.dtype
    )
    return uniform < probability


class DreamBatch:
    """B dreams in flight, updated in place by ``DreamDynamics.step`` (no per-step allocation of the
    state)."""

    def __init__(
        self,
        inputs: Tensor,
        cell: Tensor,
        start: Tensor,
        z_dim: int,
        limit: Tensor,
        head_mask: Tensor | None = None,
        member: Tensor | None = None,
        critic_states: list[State] | None = None,
    ):
        """``inputs [B, Z + H + A]``: the row ``[z_t, h_t, a_t]`` the LSTM reads next; ``cell [B, H]``: c_t;
        ``start [B]``: each dream's start frame; ``limit [B]``: the steps each dream may last;
        ``head_mask [B, H]``, ``member [B]``, ``critic_states``: see below."""
        self.inputs, self.cell, self.start, self.z_dim, self.limit = inputs, cell, start, z_dim, limit
        self.head_mask = head_mask
        """[B, H] each dream's fixed dropout mask (0 or 1 / (1 - p)) on what the heads read; None: no
        dropout."""
        self.member = member
        """[B] the ensemble member each dream runs in; None: one member."""
        self.critic_states = critic_states
        """With pessimism: each critic's LSTM state, ``([1, B, H], [1, B, H])`` (``dream.pessimism``)."""
        self.penalties = inputs.new_zeros(cell.shape[0])
        """[B] the pessimism taken off the returns until the end."""
        batch, hidden = cell.shape
        self.alive = torch.ones(batch, dtype=torch.bool, device=inputs.device)
        """[B] not ended yet."""
        self.returns = inputs.new_zeros(batch)
        """[B] the rewards summed until the end."""
        self.lengths = torch.zeros(batch, dtype=torch.long, device=inputs.device)
        """[B] steps until the end."""
        self.steps = 0
        # the step's scratch, reused: gates i, f, g, o and the new LSTM output
        self.gates = inputs.new_empty(batch, 4 * hidden)
        self.gate_parts = self.gates.split(hidden, dim=1)
        self.new_hidden = inputs.new_empty(batch, hidden)
        self.features = inputs.new_empty(batch, hidden) if head_mask is not None else None
        """The masked h_{t+1} the heads read (scratch), with dropout."""

    @property
    def size(self) -> int:
        return self.inputs.shape[0]

    @property
    def observation(self) -> Tensor:
        """[B, Z + H]: [z_t, h_t], what the controller reads (a view: copy it to keep it)."""
        return self.inputs[:, : self.z_dim + self.cell.shape[1]]

    @property
    def z(self) -> Tensor:
        """[B, Z] z_t (a view)."""
        return self.inputs[:, : self.z_dim]

    @property
    def h(self) -> Tensor:
        """[B, H] h_t, the LSTM output before reading (z_t, a_t) (a view)."""
        return self.inputs[:, self.z_dim : self.z_dim + self.cell.shape[1]]

    @property
    def action(self) -> Tensor:
        """[B, A] the encoded a_t, written by the driver before ``step`` (a view)."""
        return self.inputs[:, self.z_dim + self.cell.shape[1] :]

    def repeat(self, times: int) -> DreamBatch:
        """``times`` copies of these unstarted dreams, copy j of dream b at row j * B + b: P candidates dream
        from the same R starts (and any per-dream variation), which makes their ranking less noisy."""
        if self.steps:
            raise RuntimeError("DreamBatch.repeat after the dreams started")
        return DreamBatch(
            self.inputs.repeat(times, 1),
            self.cell.repeat(times, 1),
            self.start.repeat(times),
            self.z_dim,
            self.limit.repeat(times),
            None if self.head_mask is None else self.head_mask.repeat(times, 1),
            None if self.member is None else self.member.repeat(times),
            None
            if self.critic_states is None
            else [(h.repeat(1, times, 1), c.repeat(1, times, 1)) for h, c in self.critic_states],
        )


class DreamDynamics:
    """The memory's dream: where dreams start and how they step (see the module docstring)."""

    def __init__(
        self,
        memory: MemoryModel,
        initial_mu: Tensor | np.ndarray,
        initial_logvar: Tensor | np.ndarray | None,
        horizon: int,
        temperature: float = 1.0,
        use_mu: bool = False,
        initial_state: LSTMState | None = None,
        steps_left: np.ndarray | Sequence[int] | None = None,
        pessimism: Pessimism | None = None,
    ):
        """``initial_mu``, ``initial_logvar`` ``[N, Z]``: the start frames' posteriors (logvar None: their
        means); ``initial_state``: the memory's (h, c) ``[N, H]`` at each start frame; None = zeros;
        ``steps_left [N]``: the steps the real game had left from each start frame (a dream from there lasts
        at most that many); None = the horizon for every frame; ``pessimism``: critics whose disagreement
        the rewards pay for (``dream.pessimism``); None = off."""
        if horizon < 1 or temperature < 0:
            raise ValueError(
                f"the dream needs horizon >= 1 and temperature >= 0, got {horizon}, {temperature}"
            )
        self.memory = memory.eval()
        self.horizon, self.temperature, self.use_mu = horizon, temperature, use_mu
        if pessimism is not None and (memory.ensemble > 1 or memory.config.dropout > 0):
            raise ValueError("pessimism scores the dream's frames with one memory: no ensemble, no dropout")
        self.pessimism = pessimism
        self.weights = memory.fused_step()
        """The memory's weights laid out for ``step`` (``MemoryModel.fused_step``)."""
        self.device, self.dtype = self.weights.gate_weight.device, self.weights.gate_weight.dtype
        self.initial_mu = torch.as_tensor(initial_mu, dtype=self.dtype, device=self.device)
        if self.initial_mu.dim() != 2 or self.initial_mu.shape[1] != memory.target_dim:
            raise ValueError(
                f"initial_mu must be [N, {memory.target_dim}], got {tuple(self.initial_mu.shape)}"
            )
        # no logvar: std exp(-inf / 2) = 0, so z_0 is the mean
        self.initial_logvar = (
            torch.full_like(self.initial_mu, -torch.inf)
            if initial_logvar is None
            else torch.as_tensor(initial_logvar, dtype=self.dtype, device=self.device)
        )
        self.initial_state = start_state_tensors(
            initial_state, len(self.initial_mu), memory.config.hidden, self.device, self.dtype
        )
        count = len(self.initial_mu)
        left = np.full(count, horizon) if steps_left is None else np.asarray(steps_left).reshape(-1)
        if left.shape != (count,) or (left < 1).any():
            raise ValueError(f"steps_left must be [{count}] counts >= 1, got {left.tolist()[:8]}...")
        self.limits = torch.as_tensor(np.minimum(left, horizon), dtype=torch.long, device=self.device)

    def start(
        self,
        count: int,
        generator: torch.Generator | None = None,
        index: Sequence[int] | Tensor | None = None,
    ) -> DreamBatch:
        """``count`` dreams at start frames drawn uniformly (or at the frames ``index [count]``): z_0 the
        frame's posterior sample (its mean with ``use_mu``) and the memory's (h, c) there; with
        ``memory.dropout`` each dream's mask, with ``memory.ensemble`` each dream's member (module
        docstring)."""
        n, z_dim, hidden = len(self.initial_mu), self.memory.target_dim, self.memory.config.hidden
        if index is None:
            index = torch.randint(n, (count,), generator=generator, device=self.device)
        else:
            index = torch.as_tensor(index, dtype=torch.long, device=self.device).reshape(-1)
            if len(index) != count or bool(((index < 0) | (index >= n)).any()):
                raise ValueError(f"start index must be {count} frames in [0, {n}), got {index.tolist()}")
        z = self.initial_mu[index]
        if not self.use_mu:
            eps = torch.randn(z.shape, generator=generator, device=self.device, dtype=self.dtype)
            z = posterior_sample(z, self.initial_logvar[index], eps)
        inputs = torch.zeros(
            count, z_dim + hidden + self.memory.cond_dim, dtype=self.dtype, device=self.device
        )
        inputs[:, :z_dim] = z
        if self.initial_state is None:
            cell = inputs.new_zeros(count, hidden)
        else:
            inputs[:, z_dim : z_dim + hidden] = self.initial_state[0][index]
            cell = self.initial_state[1][index]
        limit = self.limits[index]
        head_mask = member = None
        if (p := self.memory.config.dropout) > 0:
            keep = torch.rand(count, hidden, generator=generator, device=self.device, dtype=self.dtype) >= p
            head_mask = keep.to(self.dtype) / (1 - p)
        if (members := self.memory.ensemble) > 1:
            # uniform per dream, balanced over the batch: a random order and a random rotation of 0..N-1, ...
            order = torch.randperm(count, generator=generator, device=self.device)
            member = (order + torch.randint(members, (1,), generator=generator, device=self.device)) % members
        critic_states = None if self.pessimism is None else self.pessimism.start(index)
        return DreamBatch(inputs, cell, index, z_dim, limit, head_mask, member, critic_states)

    def step(self, batch: DreamBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Advance every dream of ``batch`` by one step, in place, its actions a_t already in
        ``batch.action``. Returns r_t ``[B]`` (0 for dreams that had ended) and done_t ``[B]`` (true where a
        live dream ends now)."""
        k = self.memory.config.components
        gates, hidden, cell = batch.gates, batch.new_hidden, batch.cell
        if self.pessimism is not None:  # z_t, before the step overwrites it with z_{t+1}
            read = batch.z.clone()
        input_gate, forget_gate, cell_input, output_gate = batch.gate_parts
        # 1. the LSTM reads (z_t, a_t) from (h_t, c_t), in place in the batch's buffers
        weights = self.weights
        torch.addmm(weights.gate_bias, batch.inputs, weights.gate_weight, out=gates)
        gates[:, : 2 * hidden.shape[1]].sigmoid_()
        cell_input.tanh_()
        output_gate.sigmoid_()
        cell.mul_(forget_gate).addcmul_(input_gate, cell_input)
        torch.tanh(cell, out=hidden).mul_(output_gate)
        # 2. its output (with dropout: times the dream's mask) predicts z_{t+1}, r_t and done_t
        features = hidden
        if batch.head_mask is not None:
            features = torch.mul(hidden, batch.head_mask, out=batch.features)
        small = torch.addmm(weights.small_head_bias, features, weights.small_head_weight)
        if batch.member is not None:  # each dream's own member's columns
            small = small.view(batch.size, -1, k + 2)[torch.arange(batch.size), batch.member]
        batch.z[:] = self.sample_next(features, small[:, :k], generator, batch.member)
        outcome = small[:, k:]
        if weights.outcome_weight is not None:  # the heads' parts that read the drawn z_{t+1}
            latent = batch.z @ weights.outcome_weight
            if batch.member is not None:
                latent = latent.view(batch.size, -1, 2)[torch.arange(batch.size), batch.member]
            outcome = outcome + latent
        batch.h[:] = hidden  # the controller reads the undropped h
        reward = outcome[:, 0]
        if self.pessimism is not None:
            prediction = self.memory.heads(hidden)  # M's law of z_{t+1}, from the h_{t+1} just computed
            penalty = self.pessimism.penalty(
                prediction, self.memory, read, batch.action, batch.z, batch.critic_states
            )
            reward = reward - penalty
            batch.penalties += penalty * batch.alive
        # 3. ended dreams are masked: no reward, no steps, no second end
        live = batch.alive
        reward = reward * live
        batch.returns += reward
        batch.lengths += live
        hazard = self.memory.done_probability(outcome[:, 1])
        done = dream_done(hazard, self.temperature == 0, generator) & live
        live &= ~done
        live &= batch.lengths < batch.limit  # the real game has no more steps from its start
        batch.steps += 1
        return reward, done

    def chosen_component(self, hidden: Tensor, component: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(mu, diag, u) of each dream's chosen component: ``[B, d]``, ``[B, d]``, ``[B, d, r]`` or None.
        With an ensemble, ``component`` is ``m K + k`` for member m's component k."""
        weight, bias = self.weights.component_weight, self.weights.component_bias
        # group the dreams by component: one gather, one matmul per component on a contiguous slice, one
        # scatter
        order = torch.argsort(component)
        counts = torch.bincount(component, minlength=len(bias)).tolist()
        grouped = hidden.index_select(0, order)
        raw_grouped = hidden.new_empty(hidden.shape[0], bias.shape[1])
        start = 0
        for j, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                torch.addmm(bias[j], grouped[rows], weight[j], out=raw_grouped[rows])
                start += count
        raw = torch.empty_like(raw_grouped).index_copy_(0, order, raw_grouped)
        return self.memory.component_parameters(raw)  # a test pins them to MemoryModel._heads

    def sample_next(
        self,
        hidden: Tensor,
        logits: Tensor,
        generator: torch.Generator | None,
        member: Tensor | None = None,
    ) -> Tensor:
        """z_{t+1}: a component from softmax(logits / tau), a draw from it (covariance x tau), the inverse
        flow; ``hidden`` is what the heads read, ``member [B]`` each dream's member (None: one member)."""
        if self.temperature == 0 or logits.shape[1] == 1:
            # one component: nothing to draw, as in gmm_sample (so both consume the generator alike)
            component = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            component = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        k = self.memory.config.components
        mu, diag, u = self.chosen_component(hidden, component if member is None else member * k + component)
        one = logits.new_zeros(logits.shape[0], 1)
        z = gmm_sample(
            one,
            mu.unsqueeze(1),
            diag.unsqueeze(1),
            None if u is None else u.unsqueeze(1),
            temperature=self.temperature,
            generator=generator,
        )
        flows = self.weights.flows
        context = hidden if self.memory.config.flow_context else None
        if flows[0] is None:
            return z
        if member is None:
            return flows[0].inverse(z, context)
        # group the dreams by member, as the components above
        order = torch.argsort(member)
        grouped = z.index_select(0, order)
        context = None if context is None else context.index_select(0, order)
        start = 0
        for flow, count in zip(flows, torch.bincount(member, minlength=len(flows)).tolist()):
            if count:
                rows = slice(start, start + count)
                grouped[rows] = flow.inverse(grouped[rows], None if context is None else context[rows])
                start += count
        return torch.empty_like(grouped).index_copy_(0, order, grouped)


class DreamDriver:
    """Base of the dreams' drivers (``DreamEnv``, ``BatchedDream``): their ``dynamics``' settings,
    read-only."""

    dynamics: DreamDynamics

    @property
    def memory(self) -> MemoryModel:
        return self.dynamics.memory

    @property
    def device(self) -> torch.device:
        return self.dynamics.device

    @property
    def horizon(self) -> int:
        return self.dynamics.horizon

    @property
    def temperature(self) -> float:
        return self.dynamics.temperature

    @property
    def initial_mu(self) -> Tensor:
        """[N, Z] the start frames' posterior means."""
        return self.dynamics.initial_mu

    @property
    def initial_state(self) -> tuple[Tensor, Tensor] | None:
        """(h, c) ``[N, H]`` at the start frames, None for zeros."""
        return self.dynamics.initial_state
