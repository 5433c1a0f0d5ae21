r"""The dream: the memory model M as a ``gymnasium.Env`` (registered as ``WorldModelDream-v0``).

Alignment (docs/architecture.md, "The dream, done right"): the observation at step t is :math:`[z_t, h_t]`,
where :math:`h_t` is the LSTM output *before* reading :math:`(z_t, a_t)`. ``step(a_t)`` makes the memory read
:math:`(z_t, a_t)`; its output predicts

- :math:`z_{t+1}`: a *sample* of the mixture (``MemoryModel.sample``: temperature :math:`\tau` divides the
  mixture logits and multiplies the covariance), then :math:`y = f^{-1}(z)` through the flow;
- :math:`r_t`: the reward head's prediction for this transition;
- :math:`done_t \sim \text{Bernoulli}(\lambda_t)`, :math:`\lambda_t` the done head's per-step hazard
  (``MemoryModel.done_probability``; the temperature leaves it alone, and :math:`\tau = 0` ends the episode
  iff :math:`\lambda_t > 1/2`, Ha's rule).

The start and the step are ``dream.dynamics.DreamDynamics`` on a batch of one dream: the very code of the
batched dream CMA-ES trains on (``dream.batched``), so the dream video shows the dream the controller was
trained in.

A dream starts from :math:`z_0` of a real encoded first frame, drawn from the run's latents (a posterior
sample :math:`\mu + \sigma \epsilon`, or :math:`\mu` with ``use_mu``, the same choice the memory was trained
on), with :math:`h_0 = 0`, and is truncated at the real game's horizon. With ``controller.dream_start: any``
it starts from any frame :math:`t` of a real episode instead, with the LSTM state :math:`(h_t, c_t)` the
memory reached by reading that episode's :math:`(z_{<t}, a_{<t})`: dreams from the first frames alone rehearse
only the opening of a game (Mario's first Goomba is 28 steps in; a tiny memory's dreams last ~17). A dream
from frame t is truncated where the real game would be, after the horizon less t steps.

All randomness comes from a ``torch.Generator`` seeded from ``np_random`` at every reset, so a seeded reset
replays exactly; ``info["dream_seed"]`` is that seed (the batched dream of one rollout given a generator with
it dreams the same dream). ``reset(options={"start_index": s})`` starts at frame s instead of a drawn one.

``render_mode="rgb_array"`` decodes :math:`z_t` with the VAE to a uint8 64x64 RGB frame.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import ClassVar

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from frmdn_worldmodels.data.episodes import list_npz, load_latents
from frmdn_worldmodels.dream.dynamics import DreamBatch, DreamDriver, DreamDynamics, DreamStarts, LSTMState
from frmdn_worldmodels.dream.pessimism import Pessimism
from frmdn_worldmodels.games.envs import action_space
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.models.vae import ConvVAE, load_vae, posterior_sample, tensor_to_frames
from frmdn_worldmodels.runtime.config import Config, ConfigError, DreamStart, step_limit
from frmdn_worldmodels.runtime.io import DataError, load_checkpoint
from frmdn_worldmodels.runtime.paths import run_paths

DREAM_ENV_ID = "WorldModelDream-v0"
DREAM_STARTS = typing.get_args(DreamStart)
"""Values of ``controller.dream_start``."""


def first_latents(latents_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, logvar) ``[N, Z]`` of the first frame of every encoded episode in ``latents_dir``."""
    paths = list_npz(latents_dir)
    if not paths:
        raise DataError(f"{latents_dir}: no latents; run `python run.py encode` first")
    firsts = [load_latents(path) for path in paths]
    return (np.stack([data["mu"][0] for data in firsts]), np.stack([data["logvar"][0] for data in firsts]))


def memory_inputs(
    data: dict[str, np.ndarray], steps: int, use_mu: bool, rng: np.random.Generator
) -> np.ndarray:
    """[steps, Z + A] what the memory reads along an encoded episode's first ``steps`` transitions:
    ``[z_t, a_t]`` with z as in training (``mu``, or a posterior sample drawn from ``rng`` with ``use_mu``
    off)."""
    z = data["mu"][:steps]
    if not use_mu:
        z = posterior_sample(z, data["logvar"][:steps], rng.standard_normal(z.shape, dtype=np.float32))
    return np.concatenate([z, data["actions"][:steps]], axis=1)


@torch.inference_mode()
def warm_starts(
    latents_dir: str | Path, memory: MemoryModel, limit: int, use_mu: bool, seed: int
) -> DreamStarts:
    """(mu, logvar) ``[N, Z]`` of up to ``limit`` frames drawn from the encoded episodes, their steps t in
    their episodes, and the memory's state ``(h_t, c_t)`` there: the LSTM's after reading the episode's
    ``(z_<t, a_<t)`` (z as in training: ``mu``, or a posterior sample with ``use_mu`` off), i.e. the state the
    controller sees with that frame.

    At most ``limit`` episodes are read, each giving an equal share of distinct frames (never its final
    observation, which no action follows)."""
    paths = list_npz(latents_dir)
    if not paths:
        raise DataError(f"{latents_dir}: no latents; run `python run.py encode` first")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(paths), size=min(limit, len(paths)), replace=False))
    share = limit // len(chosen)
    episodes, frames = [], []
    for index in chosen:
        data = load_latents(paths[index])
        steps = len(data["actions"])
        episodes.append(data)
        frames.append(np.sort(rng.choice(steps, size=min(share, steps), replace=False)))
    device, dtype = memory.mixture_head.weight.device, memory.mixture_head.weight.dtype
    # the episodes read side by side, each as far as its last start frame (zeros pad the shorter ones)
    length, z_dim = max(int(wanted[-1]) for wanted in frames), memory.target_dim
    inputs = np.zeros((len(episodes), max(length, 1), z_dim + memory.cond_dim), np.float32)
    for row, (data, wanted) in enumerate(zip(episodes, frames)):
        steps = int(wanted[-1])
        inputs[row, :steps] = memory_inputs(data, steps, use_mu, rng)
    inputs = torch.as_tensor(inputs, device=device, dtype=dtype)
    owners = np.concatenate([np.full(len(wanted), row) for row, wanted in enumerate(frames)])
    times = np.concatenate(frames)
    hidden = np.empty((len(times), memory.config.hidden), np.float32)
    cell = np.empty_like(hidden)
    state = memory.initial_state(len(episodes), device)
    for t in range(length + 1):
        here = np.flatnonzero(times == t)
        if len(here):
            rows = torch.as_tensor(owners[here], device=device)
            hidden[here] = state[0][0, rows].float().cpu().numpy()
            cell[here] = state[1][0, rows].float().cpu().numpy()
        if t < length:
            _, state = memory.recur(inputs[:, t : t + 1, :z_dim], inputs[:, t : t + 1, z_dim:], state)
    mu = np.concatenate([data["mu"][wanted] for data, wanted in zip(episodes, frames)])
    logvar = np.concatenate([data["logvar"][wanted] for data, wanted in zip(episodes, frames)])
    return DreamStarts(mu, logvar, (hidden, cell), times)


def check_dream_start(value: str) -> None:
    """Refuse a ``controller.dream_start`` that is not one of ``DREAM_STARTS`` (``ConfigError`` naming the
    field)."""
    if value not in DREAM_STARTS:
        raise ConfigError(f"controller.dream_start must be one of {', '.join(DREAM_STARTS)}, got {value!r}")


def dream_starts(cfg: Config, memory: MemoryModel) -> DreamStarts:
    """Where the run's dreams begin (``controller.dream_start``): the ``first`` frames (h = c = 0) or frames
    of ``any`` step, with the memory's state there."""
    check_dream_start(cfg.controller.dream_start)
    latents = run_paths(cfg).latents
    if cfg.controller.dream_start == "first":
        mu, logvar = first_latents(latents)
        return DreamStarts(mu, logvar, None, np.zeros(len(mu), np.int64))
    return warm_starts(latents, memory, cfg.controller.dream_start_limit, cfg.memory_train.use_mu, cfg.seed)


def dream_horizon(cfg: Config) -> int:
    """Steps per dream: ``controller.max_steps`` if set, never beyond the real game's horizon
    ``env.max_steps``."""
    return step_limit(cfg, cfg.controller.max_steps)


def steps_left(cfg: Config, starts: DreamStarts) -> np.ndarray:
    """[N] the real game's steps left from each start frame: its horizon ``env.max_steps`` less the frame's
    step (at least 1: a frame is never an episode's last observation)."""
    return np.maximum(cfg.env.max_steps - starts.times, 1)


def load_memory(
    cfg: Config, device: str | torch.device | None = None, folder: Path | None = None
) -> MemoryModel:
    """The run's trained memory (``<run>/memory/memory.pt``, or the one in ``folder``) in eval mode."""
    path = (folder or run_paths(cfg).memory) / "memory.pt"
    if not path.exists():
        raise DataError(f"{path}: no trained memory; run `python run.py train-memory` first")
    try:
        memory = MemoryModel.from_checkpoint(load_checkpoint(path))
    except (KeyError, TypeError, RuntimeError) as error:
        raise DataError(
            f"{path}: not a memory checkpoint of this program ({type(error).__name__}: {error})"
        ) from None
    return memory.to(device or cfg.device).eval()


def critic_files(cfg: Config) -> list[Path]:
    """The ``memory.pt`` of each of the run's critics (``memory_train.critics``); a DataError naming the first
    one not trained yet."""
    paths = [run_paths(cfg).critic(i) / "memory.pt" for i in range(1, cfg.memory_train.critics + 1)]
    for path in paths:
        if not path.exists():
            raise DataError(
                f"{path}: no trained critic for controller.pessimism; run `python run.py train-memory` "
                f"with memory_train.critics={cfg.memory_train.critics}"
            )
    return paths


def dream_pessimism(cfg: Config, memory: MemoryModel, starts: DreamStarts) -> Pessimism | None:
    """The critics of ``controller.pessimism`` (None when 0), each with its state at the dreams' start
    frames ``starts`` (``dream_starts``: the same frames, read by each critic)."""
    if cfg.controller.pessimism == 0:
        return None
    device = memory.mixture_head.weight.device
    critics = [load_memory(cfg, device, path.parent) for path in critic_files(cfg)]
    states = [None if starts.state is None else dream_starts(cfg, critic).state for critic in critics]
    return Pessimism(critics, cfg.controller.pessimism, states, len(starts.mu))


def encode_action_tensor(action_space: spaces.Space, action) -> torch.Tensor:
    """The float [A] vector the memory reads for ``action`` (one-hot for Discrete, the clipped box action
    otherwise), as in ``frmdn_worldmodels.games.envs.encode_action``."""
    if isinstance(action_space, spaces.Discrete):
        vector = torch.zeros(int(action_space.n))
        vector[int(action) - int(action_space.start)] = 1.0
        return vector
    clipped = np.clip(
        np.asarray(action, dtype=np.float32).reshape(action_space.shape), action_space.low, action_space.high
    )
    return torch.from_numpy(clipped.reshape(-1))


class DreamEnv(gymnasium.Env, DreamDriver):
    """The memory as an environment; observations are ``[z_t, h_t]`` (float32, Z + H)."""

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        memory: MemoryModel,
        initial_mu: np.ndarray,
        initial_logvar: np.ndarray | None,
        action_space: spaces.Space,
        horizon: int = 1000,
        temperature: float = 1.0,
        use_mu: bool = False,
        vae: ConvVAE | None = None,
        render_mode: str | None = None,
        initial_state: LSTMState | None = None,
        steps_left: np.ndarray | None = None,
        pessimism: Pessimism | None = None,
    ):
        """``initial_state``: the memory's (h, c) ``[N, H]`` at each start frame (``warm_starts``);
        None = zeros; ``steps_left [N]``: the real game's steps left from each start frame (None: the
        horizon); ``pessimism``: see ``dream.pessimism``."""
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"DreamEnv renders only 'rgb_array', got render_mode={render_mode!r}")
        if render_mode == "rgb_array" and vae is None:
            raise ValueError("DreamEnv(render_mode='rgb_array') needs the VAE (vae=...) to decode frames")
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
        self.vae, self.render_mode = vae, render_mode
        self.action_space = action_space
        width = (
            int(self.action_space.n)
            if isinstance(self.action_space, spaces.Discrete)
            else int(np.prod(self.action_space.shape))
        )
        if width != memory.cond_dim:
            raise ValueError(
                f"action space {self.action_space} encodes to {width} numbers, "
                f"the memory reads {memory.cond_dim}"
            )
        # z is a Gaussian-mixture sample (unbounded); h = o * tanh(c) of the LSTM lies in [-1, 1]
        z_bound = np.full(memory.target_dim, np.inf, np.float32)
        h_bound = np.ones(memory.config.hidden, np.float32)
        bound = np.concatenate([z_bound, h_bound])
        self.observation_space = spaces.Box(-bound, bound, dtype=np.float32)
        self._generator = torch.Generator(device=self.device)
        self._dream: DreamBatch | None = None

    def _observation(self) -> np.ndarray:
        # a copy: the dream's buffers change in place at the next step
        return self._dream.observation[0].cpu().numpy().astype(np.float32, copy=True)

    @torch.inference_mode()
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        dream_seed = int(self.np_random.integers(2**63 - 1))
        self._generator.manual_seed(dream_seed)
        index = None if options is None or "start_index" not in options else [int(options["start_index"])]
        self._dream = self.dynamics.start(1, self._generator, index)
        info = {"start_index": int(self._dream.start[0]), "dream_seed": dream_seed}
        if self._dream.member is not None:
            info["member"] = int(self._dream.member[0])  # the ensemble member this dream runs in
        return self._observation(), info

    @torch.inference_mode()
    def step(self, action):
        if self._dream is None:
            raise RuntimeError("DreamEnv.step before reset")
        self._dream.action[0] = encode_action_tensor(self.action_space, action).to(self.device)
        reward, done = self.dynamics.step(self._dream, self._generator)
        terminated = bool(done[0])
        truncated = not terminated and not bool(self._dream.alive[0])
        return self._observation(), float(reward[0]), terminated, truncated, {"step": self._dream.steps}

    @torch.inference_mode()
    def render(self):
        if self.render_mode != "rgb_array" or self._dream is None:
            return None
        return tensor_to_frames(self.vae.decode(self._dream.z))[0]


def make_dream_env(
    cfg: Config, render_mode: str | None = None, temperature: float | None = None
) -> gymnasium.Env:
    """The dream of the run's trained memory, through ``gymnasium.make`` (so it carries a spec)."""
    paths = run_paths(cfg)
    vae = load_vae(paths.vae / "vae.pt", cfg.device) if render_mode == "rgb_array" else None
    memory = load_memory(cfg)
    starts = dream_starts(cfg, memory)
    return gymnasium.make(
        DREAM_ENV_ID,
        memory=memory,
        initial_mu=starts.mu,
        initial_logvar=starts.logvar,
        initial_state=starts.state,
        steps_left=steps_left(cfg, starts),
        action_space=action_space(cfg.env),
        horizon=dream_horizon(cfg),
        temperature=cfg.controller.temperature if temperature is None else temperature,
        use_mu=cfg.memory_train.use_mu,
        vae=vae,
        render_mode=render_mode,
        pessimism=dream_pessimism(cfg, memory, starts),
    )


if DREAM_ENV_ID not in gymnasium.registry:
    gymnasium.register(id=DREAM_ENV_ID, entry_point="frmdn_worldmodels.dream.env:DreamEnv")
