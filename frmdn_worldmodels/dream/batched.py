r"""The batched dream: a whole CMA-ES population x its rollouts dreamt as one tensor program.

B = P x R dreams advance together (P candidates, R rollouts each); there is no Python loop over candidates
or rollouts, only over time. Per step, with :math:`x_t = [z_t, h_t]` (``h_t`` the LSTM output *before*
reading :math:`(z_t, a_t)`), :math:`a_t = C_p(z_t, h_t)` for every candidate p at once (batched matmuls),
then the dream's step (``dream.dynamics.DreamDynamics``, the very step ``dream.env.DreamEnv``
takes, so the dream video shows the dream the controller was trained in): the LSTM reads :math:`(z_t, a_t)`,
its output gives :math:`z_{t+1}` (the chosen component's sample through the inverse flow), :math:`r_t` and
:math:`done_t \sim \text{Bernoulli}(\lambda_t)` (the done head's per-step hazard); ended dreams are masked;
every dream stops at the horizon, or where the real game would from its start frame.

Rollout r of every candidate starts from the same :math:`z_0` (a real frame: a first frame with
:math:`h_0 = c_0 = 0`, or any frame with the memory's state there, ``dream.env.warm_starts``):
candidates are compared on the same starts, which makes their ranking less noisy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from frmdn_worldmodels.dream.dynamics import DreamDriver, DreamDynamics, LSTMState
from frmdn_worldmodels.dream.pessimism import Pessimism
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.models.memory import MemoryModel


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
    starts: Tensor
    """[R] the start frame of each rollout (the same for every candidate)."""
    members: Tensor | None = None
    """[R] the ensemble member each rollout dreamt in (the same for every candidate); None: one member."""
    penalties: Tensor | None = None
    """[P, R] the pessimism taken off each return (``dream.pessimism``); None: none."""
    observations: Tensor | None = None
    """With ``record``: [P, R, T + 1, Z + H] the controller's inputs [z_t, h_t], t = 0..T (T steps dreamt)."""
    rewards: Tensor | None = None
    """With ``record``: [P, R, T] r_t (0 once a dream has ended)."""
    dones: Tensor | None = None
    """With ``record``: [P, R, T] done_t (true at the step a dream ended)."""

    @property
    def fitness(self) -> Tensor:
        """[P] mean return over each candidate's rollouts."""
        return self.returns.mean(dim=1)


class BatchedDream(DreamDriver):
    """Dreams of ``memory`` driven by a population of controllers (see the module docstring)."""

    def __init__(
        self,
        memory: MemoryModel,
        controller: Controller,
        initial_mu: Tensor | np.ndarray,
        initial_logvar: Tensor | np.ndarray | None,
        horizon: int,
        temperature: float = 1.0,
        use_mu: bool = False,
        threads: int = 1,
        initial_state: LSTMState | None = None,
        steps_left: np.ndarray | None = None,
        pessimism: Pessimism | None = None,
    ):
        """``threads``: torch threads while dreaming (0 = torch's setting). One by default: the dream's
        results then do not depend on the machine's core count (matmuls split over threads round
        differently), and it keeps its speed when other processes share the CPU, where waiting for a second
        thread at each of the step's ~100 operations made it 50x slower in our measurements
        (``perf/dream_speed.py``).
        ``initial_state``: the memory's (h, c) ``[N, H]`` at each start frame; None = zeros; ``steps_left
        [N]``: the real game's steps left from each start frame (None: the horizon); ``pessimism``: see
        ``dream.pessimism``."""
        if controller.z_dim != memory.target_dim or controller.h_dim != memory.config.hidden:
            raise ValueError(
                f"controller reads z of {controller.z_dim} and h of {controller.h_dim}, the memory has "
                f"{memory.target_dim} and {memory.config.hidden}"
            )
        if controller.action_dim != memory.cond_dim:
            raise ValueError(
                f"controller emits {controller.action_dim}-d actions, the memory reads {memory.cond_dim}"
            )
        self.dynamics = DreamDynamics(
            memory,
            initial_mu,
            initial_logvar,
            horizon,
            temperature,
            use_mu,
            initial_state,
            steps_left,
            pessimism,
        )
        self.controller, self.threads = controller, threads

    def rollout(
        self, params: Tensor, rollouts: int, generator: torch.Generator | None = None, record: bool = False
    ) -> DreamRollouts:
        """Dream ``rollouts`` episodes for each of the P candidates ``params [P, n]``; returns [P, R] outcomes
        (with ``record``, every step's observation, reward and done too)."""
        params = torch.as_tensor(params, dtype=self.dynamics.dtype, device=self.device)
        if params.dim() != 2:
            raise ValueError(f"params must be a population [P, n], got {tuple(params.shape)}")
        with torch_threads(self.threads), torch.inference_mode():
            return self._rollout(params, rollouts, generator, record)

    def _rollout(
        self, params: Tensor, rollouts: int, generator: torch.Generator | None, record: bool
    ) -> DreamRollouts:
        population, dynamics, controller = params.shape[0], self.dynamics, self.controller
        batch = dynamics.start(rollouts, generator).repeat(population)
        observations, rewards, dones = [batch.observation.clone()] if record else [], [], []
        while batch.steps < dynamics.horizon:
            # the controller acts on (z_t, h_t), h_t read before (z_t, a_t); the step writes z_{t+1}, h_{t+1}
            observed = batch.observation.reshape(population, rollouts, -1)
            uniforms = controller.uniforms(observed.shape[:2], generator)
            action = controller.squash(controller.logits(params, observed), uniforms)
            batch.action[:] = controller.encode(action).reshape(batch.size, -1)
            reward, done = dynamics.step(batch, generator)
            if record:
                observations.append(batch.observation.clone())
                rewards.append(reward)
                dones.append(done)
            # a rare check: each one waits for the whole step to finish
            if batch.steps % 8 == 0 and not bool(batch.alive.any()):
                break
        result = DreamRollouts(
            batch.returns.reshape(population, rollouts),
            batch.lengths.reshape(population, rollouts),
            batch.start[:rollouts],
            None if batch.member is None else batch.member[:rollouts],
            None if dynamics.pessimism is None else batch.penalties.reshape(population, rollouts),
        )
        if record:
            # rows are candidate-major (row p * R + r): [B, T, ...] -> [P, R, T, ...]
            result.observations = torch.stack(observations, dim=1).reshape(
                population, rollouts, batch.steps + 1, -1
            )
            result.rewards = torch.stack(rewards, dim=1).reshape(population, rollouts, -1)
            result.dones = torch.stack(dones, dim=1).reshape(population, rollouts, -1)
        return result

    def fitness(self, params: Tensor, rollouts: int, generator: torch.Generator | None = None) -> Tensor:
        """[P] mean dream return of each candidate over ``rollouts`` dreams."""
        return self.rollout(params, rollouts, generator).fitness
