r"""Pessimism in the dream (MOPO, Yu et al. 2020): a reward the dream pays less where the memories disagree.

The dream's memory M draws each frame :math:`z_{t+1}`; critics, memories trained independently on the same
data (``memory_train.critics``: other seeds, other LSTMs), read the same history :math:`(z_{\le t}, a_{\le
t})` and score that frame. Where the data showed M the way, all of them find it likely; where M invents, they
disagree. The step's penalty is

.. math:: u_t = \lambda \, \operatorname{std}_m \big[\log p_m(z_{t+1} \mid z_{\le t}, a_{\le t})\big] / Z

over M and its critics (the population std, per latent dimension), and the dream pays :math:`r_t - u_t`.
Unlike the shared-LSTM ensemble (``memory.ensemble``), independent memories can disagree about h itself.
The controller still reads M's :math:`h_t` alone, as in the real game. The critics draw nothing, so a dream
with pessimism draws the same frames as one without.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from frmdn_worldmodels.dream.dynamics import LSTMState, start_state_tensors
from frmdn_worldmodels.models.memory import MemoryModel, MemoryOutput, State


class Pessimism:
    """M's critics and the weight :math:`\\lambda` of their disagreement (see the module docstring)."""

    def __init__(
        self,
        critics: Sequence[MemoryModel],
        weight: float,
        initial_states: Sequence[LSTMState | None] | None = None,
        count: int | None = None,
    ):
        """``initial_states``: each critic's (h, c) ``[N, H]`` at the dream's N start frames (None: zeros),
        ``count``: N, to check them."""
        if not critics or weight < 0:
            raise ValueError(
                f"pessimism needs one critic or more and a weight >= 0, got {len(critics)}, {weight}"
            )
        self.critics, self.weight = [critic.eval() for critic in critics], weight
        states = initial_states if initial_states is not None else [None] * len(critics)
        if len(states) != len(critics):
            raise ValueError(f"{len(states)} initial states for {len(critics)} critics")
        parameter = next(critics[0].parameters())
        self.initial_states = [
            start_state_tensors(state, count or 0, critic.config.hidden, parameter.device, parameter.dtype)
            for critic, state in zip(self.critics, states, strict=True)
        ]

    def start(self, index: Tensor) -> list[State]:
        """Each critic's LSTM state ``([1, B, H], [1, B, H])`` at the start frames ``index [B]``."""
        states = []
        for critic, initial in zip(self.critics, self.initial_states, strict=True):
            if initial is None:
                states.append(critic.initial_state(len(index)))
            else:
                states.append((initial[0][index].unsqueeze(0), initial[1][index].unsqueeze(0)))
        return states

    def penalty(
        self,
        prediction: MemoryOutput,
        memory: MemoryModel,
        z: Tensor,
        action: Tensor,
        drawn: Tensor,
        critic_states: list[State],
    ) -> Tensor:
        """[B] :math:`u_t` for the frames ``drawn [B, Z]`` after ``z [B, Z]`` = z_t and ``action [B, A]`` =
        a_t, given M's ``prediction`` (its outputs from h_{t+1}); advances ``critic_states`` in place."""
        log_probs = [memory.log_prob(drawn, prediction)]
        for i, critic in enumerate(self.critics):
            out, critic_states[i] = critic.step(z, action, critic_states[i])
            log_probs.append(critic.log_prob(drawn, out))
        return self.weight * torch.stack(log_probs).std(dim=0, unbiased=False) / memory.target_dim
