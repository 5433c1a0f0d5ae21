r"""The controller that imitates recorded play: where CMA-ES starts with ``controller.init: imitate``.

C reads in the real game :math:`x_t = [z_t, h_t]`: :math:`z_t` a posterior sample of V's latent (its mean
with ``memory_train.use_mu``) and :math:`h_t` the memory's LSTM output before reading :math:`(z_t, a_t)`
(zeros at t = 0). Those features are rebuilt along the recorded episodes
(``dream.env.memory_inputs``, the same reading as the dream's warm starts), and the controller's
parameters are fitted to the recorded actions :math:`a_t` by full-batch Adam from its initial parameters:

- CarRacing: :math:`\frac{1}{3T} \sum_t \lVert g(W x_t + b) - a_t \rVert^2`, with g the controller's own
  squashing, so the fit is in the action box the game reads (the brake's :math:`\max(\tanh, 0)` is fitted
  through tanh where the recorded brake is on: the clamp has no gradient where tanh <= 0);
- Mario: the cross-entropy of :math:`\mathrm{softmax}(W x_t + b)` against the recorded action index (the
  controller plays the argmax).

Only the best episodes are read (``controller.imitate_top`` of the collected ones, by return): an exploration
policy blended with noise is worth imitating where it scored. With ``controller.imitate_actions: follower``
(CarRacing) the targets are not the actions played but the track follower's own action on each recorded
frame (``games.policies.follower_action``), DART's labels: the blended noise took the car off the
follower's line, and the label says how the follower gets back, so every episode is worth imitating.

With ``controller.imitate_weight`` = 0 CMA-ES ranks every candidate by its dream returns alone and the
imitation only decides where the search begins; with a weight :math:`\lambda > 0` a candidate's fitness is its
mean dream return minus :math:`\lambda` times its loss above on the same frames (TD3+BC's behaviour-cloning
term, for a search): the dream is trusted only near the play M was trained on.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from frmdn_worldmodels.data.episodes import list_npz, load_episode, load_latents
from frmdn_worldmodels.dream.env import memory_inputs
from frmdn_worldmodels.games.carracing import follower_action
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import (
    Config,
    ControllerInit,
    ImitateActions,
)
from frmdn_worldmodels.runtime.io import DataError
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.rules import check_rules

INITS = typing.get_args(ControllerInit)
"""``controller.init``: the controller's initial parameters, or the imitation of the best collected play."""
IMITATE_ACTIONS = typing.get_args(ImitateActions)
"""``controller.imitate_actions``: the actions played, or the track follower's own action on each frame."""


@dataclass(frozen=True)
class Imitation:
    """The fitted controller and how well it reproduces the recorded actions."""

    params: Tensor
    """[n] the controller's parameters."""
    episodes: int
    """Recorded episodes imitated."""
    frames: int
    """Recorded (x_t, a_t) pairs fitted."""
    mean_return: float
    """Mean return of the imitated episodes."""
    loss: float
    """The fit's final loss (MSE in the action box, or cross-entropy in nats)."""
    constant_loss: float
    """The loss of the best constant action on the same frames (the action variance, or the entropy of the
    recorded action frequencies): what ``loss`` is to be read against."""
    features: Tensor
    """[T, Z + H] the inputs C read on the imitated frames."""
    target: Tensor
    """The recorded actions there (``imitation_targets``)."""

    def summary(self) -> dict:
        return {
            "episodes": self.episodes,
            "frames": self.frames,
            "mean_return": round(self.mean_return, 3),
            "loss": round(self.loss, 6),
            "constant_loss": round(self.constant_loss, 6),
        }


@torch.inference_mode()
def controller_features(
    memory: MemoryModel, data: dict[str, np.ndarray], use_mu: bool, rng: np.random.Generator
) -> Tensor:
    """[T, Z + H] the inputs C would have read at each of the episode's T actions."""
    steps = len(data["actions"])
    inputs = torch.as_tensor(memory_inputs(data, steps, use_mu, rng)).unsqueeze(0)
    param, z_dim = memory.mixture_head.weight, memory.target_dim
    on_device = inputs.to(param.device, param.dtype)
    output, _ = memory.recur(on_device[..., :z_dim], on_device[..., z_dim:])
    hidden = torch.cat([torch.zeros_like(output[:, :1]), output[:, :-1]], dim=1)[0].float().cpu()
    return torch.cat([inputs[0, :, : memory.target_dim], hidden], dim=1)


def imitation_targets(controller: Controller, actions: Tensor) -> Tensor:
    """What the fit reads of the recorded action vectors ``[T, A]``: the box actions themselves, or Mario's
    action indices ``[T]``."""
    return actions.argmax(-1) if controller.discrete else actions


def imitation_loss(
    controller: Controller, params: Tensor, features: Tensor, target: Tensor, surrogate: bool = False
) -> Tensor:
    """The fit's loss of ``params [n]`` (a scalar) or of a population ``params [P, n]`` (``[P]``) on
    ``features [T, Z + H]`` against ``target`` (``imitation_targets``): the MSE in the action box, or the
    cross-entropy in nats. ``surrogate``: the brake's tanh itself where the recorded brake is on (the clamp
    has no gradient where tanh <= 0: all of it at the zero start), for the fit's gradient."""
    population = params.dim() == 2
    if population:
        features = features.expand(params.shape[0], *features.shape)
    logits = controller.logits(params, features)
    if controller.discrete:
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.repeat(params.shape[0]) if population else target,
            reduction="none",
        )
        return losses.reshape(params.shape[0], -1).mean(1) if population else losses.mean()
    actions = controller.squash(logits)
    if surrogate:
        brake = torch.where(target[:, 2] > 0, torch.tanh(logits[..., 2]), actions[..., 2])
        actions = torch.cat([actions[..., :2], brake[..., None]], dim=-1)
    return ((actions - target) ** 2).mean((-2, -1))


def fit_controller(
    controller: Controller,
    features: Tensor,
    actions: Tensor,
    start: Tensor,
    steps: int = 1500,
    lr: float = 0.01,
) -> tuple[Tensor, float, float]:
    """(params, final loss, the best constant action's loss): ``start`` fitted to ``actions`` [T, A] (the
    recorded vectors: the box action, or Mario's one-hot) from ``features`` [T, Z + H] by full-batch Adam."""
    target = imitation_targets(controller, actions)
    if controller.discrete:
        counts = torch.bincount(target, minlength=controller.action_dim).double()
        frequencies = counts[counts > 0] / counts.sum()
        constant = float(-(frequencies * frequencies.log()).sum())
    else:
        constant = float(actions.double().var(0, unbiased=False).mean())
    params = start.detach().clone().float().requires_grad_()
    optimiser = torch.optim.Adam([params], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        imitation_loss(controller, params, features, target, surrogate=True).backward()
        optimiser.step()
    with torch.no_grad():
        final = float(imitation_loss(controller, params, features, target))
    return params.detach(), final, constant


def follower_labels(cfg: Config, latents_path: Path) -> np.ndarray:
    """[T, 3] the track follower's own action (``games.policies.follower_action``) on each frame an action
    was played from, read from the episode file the latents at ``latents_path`` were encoded from."""
    episode_path = run_paths(cfg).episodes / latents_path.name
    if not episode_path.exists():
        raise DataError(
            f"{episode_path}: missing; controller.imitate_actions=follower reads the frames of the episodes "
            f"the latents in {latents_path.parent} were encoded from"
        )
    frames = load_episode(episode_path)["obs"][:-1]
    return np.stack([follower_action(frame, cfg.env.crop_indicators) for frame in frames])


def imitate_collected(cfg: Config, memory: MemoryModel, controller: Controller, start: Tensor) -> Imitation:
    """The controller that imitates the ``controller.imitate_top`` best of the run's encoded episodes."""
    check_rules(cfg, "controller")
    paths = list_npz(run_paths(cfg).latents)
    if not paths:
        raise DataError(f"{run_paths(cfg).latents}: no latents to imitate; run `python run.py encode` first")
    episodes = [load_latents(path) for path in paths]
    returns = np.array([float(data["rewards"].sum()) for data in episodes])
    count = max(1, round(cfg.controller.imitate_top * len(episodes)))
    best = np.sort(np.argsort(-returns, kind="stable")[:count])
    rng = np.random.default_rng(cfg.seed)
    features = torch.cat(
        [controller_features(memory, episodes[i], cfg.memory_train.use_mu, rng) for i in best]
    )
    if cfg.controller.imitate_actions == "follower":
        actions = torch.cat([torch.as_tensor(follower_labels(cfg, paths[i])) for i in best])
    else:
        actions = torch.cat([torch.as_tensor(episodes[i]["actions"]) for i in best])
    params, loss, constant = fit_controller(controller, features, actions, start)
    return Imitation(
        params,
        len(best),
        len(actions),
        float(returns[best].mean()),
        loss,
        constant,
        features,
        imitation_targets(controller, actions),
    )
