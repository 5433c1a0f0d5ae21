r"""The batched dream: a whole CMA-ES population x its rollouts dreamt as one tensor program.

B = P x R dreams advance together (P candidates, R rollouts each); there is no Python loop over candidates
or rollouts, only over time. Per step, with :math:`x_t = [z_t, h_t]` (``h_t`` the LSTM output *before*
reading :math:`(z_t, a_t)`, as in ``rollouts.dream_env.DreamEnv``):

1. :math:`a_t = C_p(z_t, h_t)` for every candidate p at once (one batched matmul);
2. the LSTM reads :math:`(z_t, a_t)`: one fused ``[z, h, a] @ W`` for all four gates;
3. from the new output :math:`h_{t+1}`: the mixture logits, :math:`r_t` and the done logit (one small matmul);
   a component :math:`k \sim \text{softmax}(\text{logits} / \tau)`; then *only the chosen component's*
   mean, diagonal and low-rank factor are computed (one matmul per component over the dreams that chose it,
   about K times fewer flops than the full head), and :math:`z_{t+1}` is drawn from it with the project's
   sampler (``gmm_sample``: covariance times :math:`\tau`) and mapped through the inverse flow;
4. :math:`done_t \sim \text{Bernoulli}(\sigma(\ell_t / \tau))`; a dream that ended stops collecting reward
   (it is masked, not removed, so the tensors keep their shape); every dream stops at the horizon.

Rollout r of every candidate starts from the same :math:`z_0` (a real frame, as in the dream env: a first frame
with :math:`h_0 = c_0 = 0`, or any frame with the memory's state there, ``rollouts.dream_env.warm_starts``):
candidates are compared on the same starts, which makes their ranking less noisy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from agents.controller import LinearController
from rollouts.dream_env import LSTMState, start_state_tensors
from worldmodel.memory import MemoryModel
from worldmodel.mixture import gmm_sample


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads (0: leave the setting alone)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class DreamRollouts:
    """Outcome of ``BatchedDream.rollout``."""

    returns: Tensor
    """[P, R] summed predicted rewards until the sampled end or the horizon."""
    lengths: Tensor
    """[P, R] steps each dream lasted."""

    @property
    def fitness(self) -> Tensor:
        """[P] mean return over each candidate's rollouts."""
        return self.returns.mean(dim=1)


class BatchedDream:
    """Dreams of ``memory`` driven by a population of linear controllers (see the module docstring)."""

    def __init__(
        self,
        memory: MemoryModel,
        controller: LinearController,
        initial_mu: Tensor | np.ndarray,
        initial_logvar: Tensor | np.ndarray | None,
        horizon: int,
        temperature: float = 1.0,
        use_mu: bool = False,
        threads: int = 1,
        initial_state: LSTMState | None = None,
    ):
        """``threads``: torch threads while dreaming (0 = torch's setting). One by default: the dream's results
        then do not depend on the machine's core count (matmuls split over threads round differently), and it
        keeps its speed when other processes share the CPU, where waiting for a second thread at each of the
        step's ~100 operations made it 50x slower in our measurements (``perf/dream_speed.py``).
        ``initial_state``: the memory's (h, c) ``[N, H]`` at each start frame; None = zeros."""
        if memory.reward_head is None or memory.done_head is None:
            raise ValueError("the dream needs a memory with reward and done heads (memory.predict_reward/predict_done)")
        if controller.z_dim != memory.target_dim or controller.h_dim != memory.config.hidden:
            raise ValueError(
                f"controller reads z of {controller.z_dim} and h of {controller.h_dim}, the memory has "
                f"{memory.target_dim} and {memory.config.hidden}"
            )
        if controller.action_dim != memory.cond_dim:
            raise ValueError(f"controller emits {controller.action_dim}-d actions, the memory reads {memory.cond_dim}")
        if horizon < 1 or temperature < 0:
            raise ValueError(f"the dream needs horizon >= 1 and temperature >= 0, got {horizon}, {temperature}")
        self.memory, self.controller = memory.eval(), controller
        self.horizon, self.temperature, self.use_mu, self.threads = horizon, temperature, use_mu, threads
        weight = memory.mixture_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.initial_mu = torch.as_tensor(initial_mu, dtype=self.dtype, device=self.device)
        if self.initial_mu.dim() != 2 or self.initial_mu.shape[1] != memory.target_dim:
            raise ValueError(f"initial_mu must be [N, {memory.target_dim}], got {tuple(self.initial_mu.shape)}")
        self.initial_std = (
            torch.zeros_like(self.initial_mu)
            if initial_logvar is None
            else torch.exp(0.5 * torch.as_tensor(initial_logvar, dtype=self.dtype, device=self.device))
        )
        self.initial_state = start_state_tensors(initial_state, len(self.initial_mu), memory, self.dtype)
        self._fuse_weights()

    @torch.no_grad()
    def _fuse_weights(self) -> None:
        """Rearrange the memory's weights for the fast step (copies: the memory itself is untouched)."""
        memory, z_dim = self.memory, self.memory.target_dim
        k, d, r = memory.config.components, memory.target_dim, memory.config.rank
        lstm = memory.lstm
        # the step's input buffer is laid out [z, h, a]: the controller reads its first Z + H columns
        fused = torch.cat([lstm.weight_ih_l0[:, :z_dim], lstm.weight_hh_l0, lstm.weight_ih_l0[:, z_dim:]], dim=1)
        self.gate_weight = fused.T.contiguous()
        self.gate_bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).clone()
        head_w, head_b = memory.mixture_head.weight, memory.mixture_head.bias
        # logits, reward and done from one small matmul
        self.small_weight = torch.cat([head_w[:k], memory.reward_head.weight, memory.done_head.weight]).T.contiguous()
        self.small_bias = torch.cat([head_b[:k], memory.reward_head.bias, memory.done_head.bias])
        # rows of component j: its mean, its raw diagonal and its raw low-rank factor
        rows = [
            torch.cat([
                torch.arange(k + j * d, k + (j + 1) * d),
                torch.arange(k + k * d + j * d, k + k * d + (j + 1) * d),
                torch.arange(k + 2 * k * d + j * d * r, k + 2 * k * d + (j + 1) * d * r),
            ])
            for j in range(k)
        ]
        self.component_weight = torch.stack([head_w[index].T for index in rows]).contiguous()  # [K, H, 2d + dr]
        self.component_bias = torch.stack([head_b[index] for index in rows])                   # [K, 2d + dr]

    def _diag(self, raw: Tensor) -> Tensor:
        """The memory's positivity map for D_k (``MemoryModel._heads``)."""
        config = self.memory.config
        diag = F.softplus(raw) if config.diag_activation == "softplus" else raw.clamp(max=30.0).exp()
        diag = diag + config.diag_floor
        return diag.clamp(*config.diag_clamp) if config.diag_clamp is not None else diag

    def _chosen_component(self, hidden: Tensor, component: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(mu, diag, u) of each dream's chosen component: ``[B, d]``, ``[B, d]``, ``[B, d, r]`` or None."""
        d, r, k = self.memory.target_dim, self.memory.config.rank, self.memory.config.components
        # group the dreams by component: one gather, one matmul per component on a contiguous slice, one scatter
        order = torch.argsort(component)
        counts = torch.bincount(component, minlength=k).tolist()
        grouped = hidden.index_select(0, order)
        raw_grouped = hidden.new_empty(hidden.shape[0], self.component_bias.shape[1])
        start = 0
        for j, count in enumerate(counts):
            if count:
                torch.addmm(self.component_bias[j], grouped[start : start + count], self.component_weight[j],
                            out=raw_grouped[start : start + count])
                start += count
        raw = torch.empty_like(raw_grouped).index_copy_(0, order, raw_grouped)
        mu, raw_diag, raw_u = raw.split([d, d, d * r], dim=1)
        # the layout of MemoryModel._heads: U_k^T row by row (a test pins the two together)
        return mu, self._diag(raw_diag), raw_u.reshape(-1, r, d).transpose(1, 2) if r > 0 else None

    def _sample_next(self, hidden: Tensor, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        """z_{t+1}: a component from softmax(logits / tau), a draw from it (covariance x tau), the inverse flow."""
        if self.temperature == 0:
            component = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            component = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        mu, diag, u = self._chosen_component(hidden, component)
        one = logits.new_zeros(logits.shape[0], 1)
        z = gmm_sample(one, mu.unsqueeze(1), diag.unsqueeze(1), None if u is None else u.unsqueeze(1),
                       temperature=self.temperature, generator=generator)
        flow = self.memory.flow
        if flow is None:
            return z
        return flow.inverse(z, hidden if self.memory.config.flow_context else None)

    def initial_states(self, rollouts: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """``[R, Z]``, ``[R, H]``, ``[R, H]``: one start per rollout: a real frame's z (a posterior sample unless
        ``use_mu``) and the memory's (h, c) there."""
        start = torch.randint(len(self.initial_mu), (rollouts,), generator=generator, device=self.device)
        z = self.initial_mu[start]
        if not self.use_mu:
            noise = torch.randn(z.shape, generator=generator, device=self.device, dtype=self.dtype)
            z = z + self.initial_std[start] * noise
        if self.initial_state is None:
            zeros = z.new_zeros(rollouts, self.memory.config.hidden)
            return z, zeros, zeros.clone()
        return z, self.initial_state[0][start], self.initial_state[1][start]

    def rollout(self, params: Tensor, rollouts: int, generator: torch.Generator | None = None) -> DreamRollouts:
        """Dream ``rollouts`` episodes for each of the P candidates ``params [P, n]``; returns [P, R] outcomes."""
        params = torch.as_tensor(params, dtype=self.dtype, device=self.device)
        if params.dim() != 2:
            raise ValueError(f"params must be a population [P, n], got {tuple(params.shape)}")
        with torch_threads(self.threads), torch.inference_mode():
            return self._rollout(params, rollouts, generator)

    def _rollout(self, params: Tensor, rollouts: int, generator: torch.Generator | None) -> DreamRollouts:
        population, batch = params.shape[0], params.shape[0] * rollouts
        z_dim, hidden_size, k = self.memory.target_dim, self.memory.config.hidden, self.memory.config.components
        features = z_dim + hidden_size
        buffer = torch.zeros(batch, features + self.controller.action_dim, dtype=self.dtype, device=self.device)
        z, hidden_start, cell_start = self.initial_states(rollouts, generator)
        buffer[:, :z_dim] = z.repeat(population, 1)
        buffer[:, z_dim:features] = hidden_start.repeat(population, 1)
        cell = cell_start.repeat(population, 1)
        gates = buffer.new_empty(batch, 4 * hidden_size)  # reused every step: no per-step allocations
        hidden = buffer.new_empty(batch, hidden_size)
        input_gate, forget_gate, cell_input, output_gate = gates.split(hidden_size, dim=1)
        returns = torch.zeros(batch, dtype=self.dtype, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        alive = torch.ones(batch, dtype=torch.bool, device=self.device)
        for step in range(self.horizon):
            # 1. the controller acts on (z_t, h_t), h_t read before (z_t, a_t)
            observed = buffer[:, :features].reshape(population, rollouts, features)
            action = self.controller.squash(self.controller.logits(params, observed))
            buffer[:, features:] = self.controller.encode(action).reshape(batch, -1)
            # 2. the LSTM reads (z_t, a_t): gates i, f, g, o (in place, in preallocated buffers)
            torch.addmm(self.gate_bias, buffer, self.gate_weight, out=gates)
            gates[:, : 2 * hidden_size].sigmoid_()
            cell_input.tanh_()
            output_gate.sigmoid_()
            cell.mul_(forget_gate).addcmul_(input_gate, cell_input)
            torch.tanh(cell, out=hidden).mul_(output_gate)
            # 3. its output predicts z_{t+1}, r_t, done_t
            small = torch.addmm(self.small_bias, hidden, self.small_weight)
            buffer[:, :z_dim] = self._sample_next(hidden, small[:, :k], generator)
            buffer[:, z_dim:features] = hidden
            # 4. rewards count until the sampled end
            returns += small[:, k] * alive
            lengths += alive
            if self.temperature == 0:
                ended = small[:, k + 1] > 0
            else:
                end_probability = torch.sigmoid(small[:, k + 1] / self.temperature)
                ended = torch.rand(batch, generator=generator, device=self.device, dtype=self.dtype) < end_probability
            alive &= ~ended
            if step % 8 == 7 and not bool(alive.any()):
                break
        return DreamRollouts(returns.reshape(population, rollouts), lengths.reshape(population, rollouts))

    def fitness(self, params: Tensor, rollouts: int, generator: torch.Generator | None = None) -> Tensor:
        """[P] mean dream return of each candidate over ``rollouts`` dreams."""
        return self.rollout(params, rollouts, generator).fitness
