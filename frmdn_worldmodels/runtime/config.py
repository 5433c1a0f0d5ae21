"""One config system: YAML files read into typed dataclasses, with ``--set a.b=c`` overrides.

Every section is a dataclass with a default for each field, so the embedded tiny config only has to name what
it changes. Unknown keys are rejected with the dotted name of the key and the file it came from.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the clone's configs/, linked
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


# The values a string field accepts: the loader refuses any other, naming the field (``_coerce``), and
# ``run.py <command> --help`` lists them.
MarioActions = Literal["right_only", "simple", "complex"]
MemoryKind = Literal["rmdn", "frmdn"]
DiagActivation = Literal["softplus", "exp"]
Covariance = Literal["full", "diagonal"]
ControllerInit = Literal["zeros", "imitate"]
ImitateActions = Literal["recorded", "follower"]
DreamStart = Literal["first", "any"]
IterateNoise = Literal["action", "params"]
ImageDataset = Literal["auto", "digits", "mnist", "cifar10"]
Optimizer = Literal["adam", "rmsprop"]
TrainIn = Literal["dream", "real"]
Keep = Literal["champion", "mean"]
Policy = Literal["argmax", "sample"]
SweepExtra = Literal["flow_context", "heads"]
StalePolicy = Literal["redo", "refuse"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the source."""


@dataclass(frozen=True)
class Bounds:
    """The range of a number field, in its type (``Annotated[int, Bounds(1)]``): the loader refuses a value
    outside it, naming the field (``_coerce``), and ``run.py <command> --help`` shows it."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""
    """Said after the range in the error and the help, e.g. what the low end means."""

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{self.low:g}, {self.high:g}{right}"
        else:
            text = f"> {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"{text} ({self.why})" if self.why else text


POSITIVE = Bounds(0, low_open=True)
FRACTION = Bounds(0, 1, high_open=True)
"""[0, 1): a share of something that must leave some of it."""
PROBABILITY = Bounds(0, 1)


@dataclass
class EnvConfig:
    name: str = "carracing"
    """Which game: ``carracing`` (CarRacing-v3, 3-d continuous action), ``mario`` (SuperMarioBros), or your
    own ``games.game.Game`` as ``"package.module:ATTRIBUTE"``."""
    mario_level: str = "1-1"
    """Mario world-stage, e.g. ``1-1`` for SuperMarioBros-1-1-v0."""
    mario_actions: MarioActions = "simple"
    """Mario action set: ``right_only``, ``simple`` (SIMPLE_MOVEMENT) or ``complex``."""
    doom_skill: Annotated[int, Bounds(1, 5)] = 5
    """VizDoom skill, 1-5 (World Models': 5; Take Cover's default, 4, throws the same volleys ~3x slower)."""
    frame_size: int = 64
    """Side of the square RGB frame fed to the VAE (resized with opencv); the ConvVAE takes 64 only."""
    max_steps: Annotated[int, Bounds(1)] = 1000
    """The game's horizon in agent steps: the real game's time limit, which ``collect.max_steps`` and
    ``controller.max_steps`` may shorten but never extend (``step_limit``)."""
    action_repeat: Annotated[int, Bounds(1)] = 1
    """How many env frames one agent action lasts (rewards are summed)."""
    crop_indicators: bool = True
    """CarRacing: drop the 12-pixel indicator bar at the bottom before resizing, as World Models did."""


@dataclass
class CollectConfig:
    episodes: Annotated[int, Bounds(0)] = 8
    """Number of episodes to collect (resumable: complete files are skipped)."""
    max_steps: Annotated[int, Bounds(0)] = 0
    """Cap on steps per collected episode; 0 = the game's horizon (env.max_steps), never beyond it."""
    policy: str = "auto"
    """Exploration policy: ``auto``, ``brownian``/``track_follower``/``random`` (CarRacing),
    ``right_biased``/``ram_expert``/``random`` (Mario)."""
    action_persistence: Annotated[float, FRACTION] = 0.9
    """How strongly an exploration action persists from one step to the next (0 = white noise)."""
    follower_blend: Annotated[float, PROBABILITY] = 1.0
    """CarRacing ``track_follower``: the largest per-episode weight of the brownian driver in its blend
    (in [0, 1]; 0 = the follower alone, 1 = anything up to the brownian car)."""
    follower_gas_max: Annotated[float, Bounds(0.15, 1.0)] = 0.15
    """CarRacing ``track_follower``: the follower's gas on the straight is drawn per episode from U[0.15,
    this] (in [0.15, 1]; 0.15 = always 0.15), so the data show what driving faster costs."""
    mario_repeat: Annotated[int, Bounds(1)] = 4
    """Mean number of steps a Mario exploration action is repeated."""
    right_bias: Annotated[float, PROBABILITY] = 0.8
    """Mario ``right_biased``: probability that a newly drawn action holds the right button."""
    expert_noise: Annotated[float, PROBABILITY] = 0.3
    """Mario ``ram_expert``: the largest per-episode share of steps that play a random combination instead
    of the expert's (in [0, 1]; the share is drawn per episode from U[0, this])."""
    retries: Annotated[int, Bounds(0)] = 2
    """How often a failed episode is retried before it is reported as failed."""
    workers: Annotated[int, Bounds(0)] = 0
    """Parallel Ray workers; 0 = one per core that Ray sees."""
    episode_timeout: Annotated[float, Bounds(0)] = 600.0
    """Seconds one episode may take on a ready worker before the worker is killed and the episode retried;
    also how long collection waits with no worker ready before the episodes left fail (0 = no limit)."""


SPRITE_WEIGHTS = {"player": "player_weight", "enemies": "enemy_weight"}
"""The ``vae`` setting that weighs each sprite array's patches (Super Mario Bros' episodes record where the
sprites are)."""


@dataclass
class VAEConfig:
    latent_dim: Annotated[int, Bounds(1)] = 32
    """Size of z."""
    epochs: Annotated[int, Bounds(0)] = 10
    """Training epochs over all frames of the training episodes."""
    batch_size: Annotated[int, Bounds(1)] = 64
    """Frames per optimiser step."""
    lr: Annotated[float, POSITIVE] = 1e-3
    """Adam learning rate."""
    kl_tolerance: Annotated[float, Bounds(0)] = 0.5
    """Free bits per latent dimension (World Models: 0.5): the KL term is max(KL, tolerance * latent_dim)."""
    player_weight: Annotated[float, Bounds(1)] = 1.0
    """Weight of the squared error in the 8 x 8 patch around the player (Mario; 1 = every pixel alike)."""
    enemy_weight: Annotated[float, Bounds(1)] = 1.0
    """Weight of the squared error in the 8 x 8 patch around each enemy (Mario; 1 = every pixel alike; where a
    patch overlaps the player's, the larger weight)."""
    val_fraction: Annotated[float, FRACTION] = 0.1
    """Fraction of episodes held out for validation."""
    max_frames: Annotated[int, Bounds(0)] = 0
    """Train on whole episodes up to this many frames (0 = all; validation shrinks in proportion): V needs
    fewer frames than M, which reads every episode either way."""
    shuffle_buffer: Annotated[int, Bounds(1)] = 4096
    """Frames held in the streaming shuffle buffer."""
    patience: Annotated[int, Bounds(0)] = 0
    """Early stopping: epochs without a better validation loss (0 = never stop early)."""
    grad_clip: Annotated[float, Bounds(0)] = 0.0
    """Max gradient norm (0 = no clipping; non-finite gradients are skipped either way)."""
    checkpoint_every: Annotated[int, Bounds(0)] = 250
    """Optimiser steps between mid-epoch checkpoints (0 = only at the end of each epoch)."""
    log_every: Annotated[int, Bounds(1)] = 10
    """Optimiser steps between training-loss rows in vae/metrics.jsonl."""
    encode_batch: Annotated[int, Bounds(1)] = 64
    """Frames per forward pass when encoding episodes to latents."""


@dataclass
class MemoryConfig:
    kind: MemoryKind = "frmdn"
    """``rmdn`` (no flow, the baseline) or ``frmdn`` (coupling flow on the target)."""
    hidden: Annotated[int, Bounds(1)] = 256
    """LSTM hidden size."""
    components: Annotated[int, Bounds(1)] = 5
    """Mixture components K."""
    rank: Annotated[int, Bounds(0)] = 3
    """Rank d' of the precision's low-rank factor U_k; 0 = diagonal."""
    flow_blocks: Annotated[int, Bounds(1)] = 2
    """Affine coupling blocks in the flow (frmdn only)."""
    flow_hidden: Annotated[int, Bounds(1)] = 64
    """Hidden width of each coupling block's s and t networks."""
    flow_context: bool = False
    """Condition the flow on the LSTM state (the paper's Fig. 6 extension)."""
    diag_activation: DiagActivation = "softplus"
    """Positivity map for the diagonal precision D_k: ``softplus`` or ``exp``."""
    diag_floor: Annotated[float, Bounds(0)] = 1e-4
    """Lower bound added to every diagonal precision element."""
    diag_clamp: list[float] | None = None
    """Optional [low, high] clamp of the diagonal elements (the paper used [0.1, 1.9] for the world model)."""
    predict_reward: bool = True
    """Add a reward head (needed by the dream)."""
    predict_done: bool = True
    """Add an episode-end head (needed by the dream)."""
    dropout: Annotated[float, FRACTION] = 0.0
    """Dropout p on the LSTM output before the heads (Dropout's Dream Land): in training, and in the dream one
    fixed mask per dream; 0 = off. The LSTM's own state and the controller's h are never dropped."""
    ensemble: Annotated[int, Bounds(1)] = 1
    """Head sets (mixture, reward, done heads and flow) on the shared LSTM; the loss is their mean and each
    dream runs in one member drawn at its start. 1 = the single memory."""
    heads_read_z: bool = True
    """The reward and done heads read z_{t+1} beside h_{t+1}: the recorded latent in training, the sampled one
    in the dream, so r_t and done_t belong to the frame the dream shows (false: h_{t+1} alone, the reward and
    done expected from the history and the action)."""


@dataclass
class MemoryTrainConfig:
    epochs: Annotated[int, Bounds(0)] = 20
    """Passes over the training sequences."""
    batch_size: Annotated[int, Bounds(1)] = 16
    """Sequences per step."""
    seq_len: Annotated[int, Bounds(1)] = 100
    """Length of the chunks episodes are cut into."""
    lr: Annotated[float, POSITIVE] = 1e-3
    """Learning rate."""
    optimizer: Optimizer = "adam"
    """``adam`` or ``rmsprop``."""
    grad_clip: Annotated[float, Bounds(0)] = 1.0
    """Max gradient norm (0 = no clipping)."""
    patience: Annotated[int, Bounds(0)] = 5
    """Early stopping: epochs without a better validation NLL (0 = never stop early)."""
    use_mu: bool = False
    """Train on the VAE mean instead of a fresh posterior sample each epoch."""
    val_fraction: Annotated[float, FRACTION] = 0.1
    """Fraction of episodes for validation."""
    test_fraction: Annotated[float, FRACTION] = 0.1
    """Fraction of episodes for the test NLL."""
    done_pos_weight: Annotated[float, Bounds(0)] = 0.0
    """pos_weight of the done loss; 0 = set from the data (negatives / positives)."""
    reward_weight: Annotated[float, Bounds(0)] = 1.0
    """Weight of the reward loss in the total loss."""
    done_weight: Annotated[float, Bounds(0)] = 1.0
    """Weight of the done loss in the total loss."""
    done_horizon: Annotated[int, Bounds(1)] = 1
    """The done target is 1 on the last ``done_horizon`` steps of an episode the game ended (1 = on its last
    step only): the head then says "the game ends within this many steps", and a dream ends that early."""
    carry_state: bool = True
    """Truncated backpropagation through time: an episode's windows are read in order, each starting from the
    LSTM state the previous one ended in (detached), so M learns on states of every age the agent reaches;
    false: every window starts from a zero state."""
    max_steps_per_epoch: Annotated[int, Bounds(0)] = 0
    """Cap on optimiser steps per epoch, for quick runs (0 = every training window once)."""
    checkpoint_every: Annotated[int, Bounds(0)] = 100
    """Optimiser steps between mid-epoch checkpoints (0 = only at the end of each epoch)."""
    log_every: Annotated[int, Bounds(1)] = 10
    """Optimiser steps between training-loss rows in memory/metrics.jsonl."""
    seed: Annotated[int, Bounds(0)] | None = None
    """Seed of the model's initialisation, its per-epoch posterior samples and batch order; None = the run's
    ``seed``. The episode split and the fixed validation/test sample always follow the run's ``seed``, so
    models trained with different seeds are scored on the same test data."""
    critics: Annotated[int, Bounds(0)] = 0
    """Memories trained beside M, independently (the same data and settings, seeds ``seed`` + 1, 2, ...,
    in ``<run>/memory/critics/c<i>/``): their disagreement with M about each dreamt frame is what the
    controller section's ``pessimism`` takes off the dream's reward."""
    sweep_kinds: list[MemoryKind] = field(default_factory=lambda: ["rmdn", "frmdn"])
    """``train-memory --sweep table1``: the models compared (rows of the paper's Table 1)."""
    sweep_components: list[Annotated[int, Bounds(1)]] = field(default_factory=lambda: [1, 3, 5])
    """``--sweep table1``: mixture sizes K (the table's columns)."""
    sweep_ranks: list[Annotated[int, Bounds(0)]] = field(default_factory=lambda: [0, 1, 2, 3])
    """``--sweep table1``: precision ranks d' (0 = diagonal)."""
    sweep_seeds: Annotated[int, Bounds(1)] = 1
    """``--sweep table1``: training seeds per cell (``memory_train.seed`` + 0, 1, ...); the tables give the
    mean and std over them, and FRMDN - RMDN is paired by seed."""
    sweep_extra: list[SweepExtra] = field(default_factory=list)
    """``--sweep table1``: extra rows at the d' of the grid's best FRMDN cell, every K, once the grid is done:
    ``flow_context`` (FRMDN with the flow conditioned on the LSTM state) and ``heads`` (RMDN and FRMDN with
    the reward and done heads on, as the dream uses them; the grid must have them off)."""


@dataclass
class ControllerConfig:
    train_in: TrainIn = "dream"
    """Where CMA-ES evaluates candidates: ``dream`` or ``real``."""
    generations: Annotated[int, Bounds(1)] = 10
    """CMA-ES generations."""
    population: Annotated[int, Bounds(3)] = 16
    """Candidates per generation."""
    rollouts: Annotated[int, Bounds(1)] = 4
    """Rollouts per candidate; fitness is their mean return."""
    sigma: Annotated[float, POSITIVE] = 0.1
    """Initial CMA-ES step size."""
    covariance: Covariance = "full"
    """CMA-ES's covariance: ``full`` (an n x n matrix: its update and checkpoint grow as n^2) or ``diagonal``
    (sep-CMA-ES: n entries, for a controller with a hidden layer, whose n runs to thousands)."""
    init: ControllerInit = "zeros"
    """Where CMA-ES starts: ``zeros`` (World Models: the controller's initial parameters) or ``imitate`` (the
    controller fitted to the recorded actions of the best collected episodes, ``train/imitate.py``)."""
    imitate_top: Annotated[float, Bounds(0, 1, low_open=True)] = 0.25
    """``init: imitate``: the share of the collected episodes, the highest returns first, that is imitated."""
    imitate_weight: Annotated[float, Bounds(0, float("inf"), high_open=True)] = 0.0
    """``init: imitate``: each candidate's fitness (and the score the best is kept by) is its mean dream
    return minus this weight times its imitation loss on the imitated frames (return per unit of action MSE,
    or per nat for Mario); 0 = the dream return alone."""
    imitate_actions: ImitateActions = "recorded"
    """``init: imitate``: what the imitation is fitted to on the imitated frames: ``recorded`` (the actions
    played) or ``follower`` (CarRacing: the track follower's own action on each recorded frame, the
    exploration noise left out, as in DART)."""
    hidden: Annotated[int, Bounds(0)] = 0
    """Hidden tanh units of the controller: 0 = World Models' linear ``a = g(W [z, h] + b)``; N > 0 = Ha's
    variant with one hidden layer, ``a = g(W2 tanh(W1 [z, h] + b1) + b2)``."""
    policy: Policy = "argmax"
    """A discrete game's action: ``argmax`` of C's logits (World Models) or ``sample`` (drawn from their
    softmax, in the dream and in the game alike, each episode's draws seeded by its seed)."""
    temperature: Annotated[float, Bounds(0)] = 1.15
    """Dream temperature tau (divides logits, multiplies covariance)."""
    pessimism: Annotated[float, Bounds(0)] = 0.0
    """Pessimism in the dream (MOPO): each step's reward less this weight times the disagreement of M and
    its critics (``memory_train.critics``) about the frame the dream drew, the std over them of
    log p(z_{t+1}) per latent dimension; 0 = off."""
    eval_every: Annotated[int, Bounds(0)] = 5
    """Every N generations the controller ``keep`` names is scored on ``eval_episodes`` more episodes, and
    kept in ``best.pt`` when it scores above the best so far."""
    keep: Keep = "champion"
    """What that evaluation scores: ``champion`` (the generation's best-ranked candidate) or ``mean``
    (CMA-ES's mean, as World Models' ``es.current_param()``: no winner of a draw of noisy rollouts)."""
    eval_episodes: Annotated[int, Bounds(1)] = 4
    """Episodes for that periodic evaluation."""
    max_steps: Annotated[int, Bounds(0)] = 0
    """Cap on the controller's training rollouts (dreams and real games); 0 = the game's horizon
    (env.max_steps), never beyond it."""
    workers: Annotated[int, Bounds(0)] = 0
    """Ray rollout actors for real-game evaluation; 0 = one per core."""
    retries: Annotated[int, Bounds(0)] = 2
    """How often a failed real-game rollout job (its actor died, raised or timed out) is run again before the
    stage fails."""
    job_timeout: Annotated[float, Bounds(0)] = 1800.0
    """Seconds one real-game rollout job (up to ``envs_per_worker`` episodes in lockstep) may run on a ready
    actor before the actor is killed and the job run again (a hung emulator); also how long the jobs may wait
    with no actor ready (the cluster lost the nodes they need) before the stage fails. 0 = no limit."""
    envs_per_worker: Annotated[int, Bounds(1)] = 16
    """Real-game envs one rollout actor plays in lockstep (one batched V + M + C call per step for all)."""
    dream_threads: Annotated[int, Bounds(0)] = 1
    """Torch threads of the batched dream (0 = torch's default); results depend on it, so it is fixed per
    run."""
    dream_start: DreamStart = "first"
    """Where dreams begin: ``first`` frames of the collected episodes with h = 0 (World Models), or ``any``
    frame, with the memory's state after reading the real episode up to it (dreams then cover the whole
    explored game)."""
    dream_start_limit: Annotated[int, Bounds(1)] = 4096
    """``any``: at most this many start frames, spread over at most this many episodes."""
    eval_real_episodes: int = 0
    """Dream training: at every periodic evaluation, also score the generation's best candidate on this many
    real episodes (Ray workers), next to its dream score: the dream-vs-real gap (0 = off). Candidates are
    still ranked and kept by their dream scores alone."""
    seed: Annotated[int, Bounds(0)] | None = None
    """Seed of the search (CMA-ES's draws, the training dreams or episodes, a hidden layer's initial weights);
    None = the run's ``seed``. The periodic evaluations follow the run's ``seed``: replicate searches on one
    run's M are scored on the same dreams and episodes."""


@dataclass
class IterateConfig:
    iterations: Annotated[int, Bounds(0)] = 0
    """Rounds of World Models' iterative training after the pipeline's first controller (``run.py iterate``;
    ``pipeline`` runs them when > 0): collect with the best controller, train M further, continue CMA-ES."""
    episodes: Annotated[int, Bounds(1)] = 16
    """Real episodes each iteration collects with the current best controller (plus exploration noise)."""
    noise: IterateNoise = "action"
    """Exploration noise while collecting: ``action`` (CarRacing: Gaussian noise of std ``noise_scale`` on
    each action, clipped to the box; Mario: a uniformly random action with probability ``noise_scale``) or
    ``params`` (one Gaussian perturbation of std ``noise_scale`` of the controller's parameters per
    episode)."""
    noise_scale: Annotated[float, Bounds(0)] = 0.1
    """Size of the exploration noise (see ``noise``)."""
    memory_epochs: Annotated[int, Bounds(1)] = 5
    """Epochs of further training of M per iteration (from its previous weights) on every episode so far; also
    V's with ``retrain_vae``."""
    generations: Annotated[int, Bounds(1)] = 10
    """CMA-ES generations per iteration, continuing from the previous iteration's mean in the new dream."""
    eval_episodes: Annotated[int, Bounds(1)] = 16
    """Real episodes scoring each iteration's best controller (and the random policy, on the same seeds)."""
    retrain_vae: bool = False
    """Also train V further on every episode so far (the latents are then encoded again)."""


@dataclass
class EvaluateConfig:
    episodes: Annotated[int, Bounds(1)] = 10
    """Real-game episodes scored by ``evaluate``."""
    video: bool = True
    """Write a video of the best and the worst episode."""
    random_baseline: bool = True
    """Also score uniformly random actions on the same episode seeds, for comparison."""
    video_scale: Annotated[int, Bounds(1)] = 4
    """Enlarge the 64x64 frames this many times in the videos."""
    teacher: str = ""
    """Also score this hand-written driver of the game alone (``Game.teachers``: CarRacing's
    ``track_follower``, Mario's ``ram_expert``) on the same seeds, and the paired difference agent -
    teacher; empty: none."""


@dataclass
class FidelityConfig:
    controllers: Annotated[int, Bounds(0)] = 35
    """Perturbed and random controllers in ``run.py fidelity``'s set, dealt in turn over its scales (besides
    the kept controller, the CMA-ES start and the zeros)."""
    dreams: Annotated[int, Bounds(2, why="a standard error needs two")] = 64
    """Dreams per controller (the same start frames and generator seed for every controller)."""
    real_episodes: Annotated[int, Bounds(2, why="a standard error needs two")] = 8
    """Real episodes per controller (the same seeds for every controller)."""
    seed: int = 0
    """Which draw of perturbations, dreams and real episodes, with the run's ``seed``."""


@dataclass
class RayConfig:
    address: str | None = None
    """Cluster to join (``auto`` or host:port); None = RAY_ADDRESS if set, else a local Ray."""
    num_cpus: Annotated[int, Bounds(1)] | None = None
    """CPUs for a local Ray; None = the machine's cores."""


@dataclass
class BenchmarkMemoryConfig(MemoryConfig):
    """The memory of a benchmark model: its kind and rank come from the grid (``kinds``, ``ranks``), and it
    has no reward or done head (a benchmark models one sequence, with no actions)."""

    kind: str = "grid"
    rank: int = -1
    predict_reward: bool = False
    predict_done: bool = False


@dataclass
class SpeechConfig:
    data: str | None = None
    """Folder of .wav files (TIMIT, Blizzard, Accent); required for the speech benchmark."""
    frame: Annotated[int, Bounds(2, why="the flow splits a frame in halves")] = 200
    """Samples per time step."""
    sample_rate: Annotated[int, Bounds(1)] = 16000
    """Target sample rate (other rates are resampled)."""
    clip_seconds: Annotated[float, Bounds(0)] = 0.0
    """Cut sequences to this length (0.5 for Accent and Blizzard in the paper); 0 = whole files."""

    @property
    def clip_frames(self) -> int:
        """Frames in one clip of ``clip_seconds`` (0: whole files)."""
        return round(self.clip_seconds * self.sample_rate / self.frame) if self.clip_seconds > 0 else 0

    @dataclass
    class Memory(BenchmarkMemoryConfig):
        """The memory section with the speech benchmark's defaults (a partial ``speech.memory`` keeps
        them)."""

        hidden: Annotated[int, Bounds(1)] = 256
        components: Annotated[int, Bounds(1)] = 20

    memory: Memory = field(default_factory=Memory)
    """Every model's memory settings (``hidden``: the LSTM, 256 here, the paper's 2000-4000; ``components``:
    K, 20; the ``flow_*`` and ``diag_*`` fields). ``kind`` and ``rank`` stay ``grid`` and -1: each model takes
    its own from ``kinds`` and ``ranks`` (another value is refused unless that list holds just it).
    ``predict_reward``/``predict_done`` must stay false: speech has no rewards or episode ends."""
    kinds: list[str] = field(default_factory=lambda: ["rmdn", "frmdn"])
    """Models to train: ``rmdn`` and/or ``frmdn`` (the table's rows)."""
    ranks: list[int] = field(default_factory=lambda: [0])
    """Ranks d' to compare (0 = diagonal, the paper's best for speech)."""
    epochs: Annotated[int, Bounds(1)] = 10
    """Training epochs."""
    batch_size: Annotated[int, Bounds(1)] = 32
    """Sequences per step."""
    lr: Annotated[float, POSITIVE] = 1e-3
    """Adam learning rate."""
    grad_clip: Annotated[float, Bounds(0)] = 1.0
    """Max gradient norm (0 = no clipping)."""
    patience: Annotated[int, Bounds(0)] = 5
    """Early stopping: epochs without a better validation NLL (0 = never stop early)."""
    max_files: Annotated[int, Bounds(0)] = 0
    """Read at most this many wav files (a seeded random subset; 0 = all)."""
    max_eval_sequences: Annotated[int, Bounds(0)] = 0
    """Cap on validation/test sequences (a seeded random subset; 0 = all)."""
    threads: Annotated[int, Bounds(0)] = 0
    """Torch CPU threads (0 = torch's default); 1 is far faster for small models on a busy machine."""


@dataclass
class ImageConfig:
    dataset: ImageDataset = "auto"
    """``digits`` (scikit-learn 8x8, shipped: takes no ``data``), ``mnist`` (IDX files), ``cifar10`` (python
    batches), or ``auto``: the digits without ``data``, else MNIST or CIFAR-10 as the folder's files say."""
    data: str | None = None
    """Folder with the MNIST IDX files or the CIFAR-10 python batches."""
    logit_lambda: Annotated[float, Bounds(0.0, 0.5, high_open=True)] | None = None
    """lambda of the logit transform; None = 1e-6 for MNIST/digits, 0.05 for CIFAR-10."""

    @dataclass
    class Memory(BenchmarkMemoryConfig):
        """The memory section with the image benchmark's defaults (a partial ``image.memory`` keeps them)."""

        hidden: Annotated[int, Bounds(1)] = 32
        components: Annotated[int, Bounds(1)] = 10

    memory: Memory = field(default_factory=Memory)
    """Every model's memory settings (``hidden``: the LSTM, 32 as in the paper; ``components``: K, 10; the
    ``flow_*`` and ``diag_*`` fields). ``kind`` and ``rank`` stay ``grid`` and -1: each model takes its own
    from ``kinds`` and ``ranks`` (another value is refused unless that list holds just it).
    ``predict_reward``/``predict_done`` must stay false: images have no rewards or episode ends."""
    kinds: list[str] = field(default_factory=lambda: ["rmdn", "frmdn"])
    """Models to train: ``rmdn`` and/or ``frmdn`` (the table's rows)."""
    ranks: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Ranks d' to compare (0 = diagonal; the table's columns)."""
    epochs: Annotated[int, Bounds(1)] = 30
    """Training epochs."""
    batch_size: Annotated[int, Bounds(1)] = 256
    """Images per step."""
    lr: Annotated[float, POSITIVE] = 1e-3
    """Adam learning rate."""
    single_gaussian: bool = True
    """Also fit the class-conditional full-covariance Gaussian baseline (closed-form maximum likelihood)."""
    grad_clip: Annotated[float, Bounds(0)] = 1.0
    """Max gradient norm (0 = no clipping)."""
    patience: Annotated[int, Bounds(0)] = 10
    """Early stopping: epochs without a better validation NLL (0 = never stop early)."""
    max_train: Annotated[int, Bounds(0)] = 0
    """Train on at most this many images (the first of the seeded order; 0 = all)."""
    max_test: Annotated[int, Bounds(0)] = 0
    """Evaluate on at most this many validation/test images (0 = all)."""
    flip: bool = True
    """CIFAR-10 only: random horizontal flips of training images (the MAF protocol's augmentation)."""
    samples_per_class: Annotated[int, Bounds(1)] = 10
    """Columns of the PNG grid of class-conditioned samples."""
    threads: Annotated[int, Bounds(0)] = 1
    """Torch CPU threads (0 = torch's default); 1 suits these tiny models (2 ran 35x slower on a busy 2-core
    box)."""


@dataclass
class Config:
    name: str = "tiny"
    """Run name: outputs go to ``<runs_dir>/<name>/``."""
    runs_dir: str = "runs"
    """Folder holding every run."""
    seed: Annotated[int, Bounds(0)] = 0
    """Seed for numpy, torch and the envs."""
    device: str = "cpu"
    """Torch device for training and the dream (``cpu``, ``cuda``, ``mps``)."""
    threads: Annotated[int, Bounds(0, why="0 = torch's default")] = 0
    """Torch CPU threads of the command's own process (0 = torch's default, one per core). 1 keeps the VAE and
    memory stages' speed on a machine other processes keep busy, where two threads ran 10-30x slower here."""
    stale: StalePolicy = "redo"
    """What a stage does when its folder was made from other inputs (settings or upstream outputs): ``redo``
    it, or ``refuse`` with the list of what changed (``--refuse-stale``)."""
    tensorboard: bool = False
    """Also write every training loop's metrics (VAE, memory, benchmarks) as TensorBoard scalars, to
    ``<stage folder>/tensorboard/`` (``tensorboard --logdir runs/<name>``)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    memory_train: MemoryTrainConfig = field(default_factory=MemoryTrainConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    image: ImageConfig = field(default_factory=ImageConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


VAE_FRAME_SIZE = 64
"""The side of the square frames the ConvVAE (``frmdn_worldmodels.models.vae``) reads."""
DEVICE_KINDS = ("cpu", "cuda", "mps")


def step_limit(cfg: Config, cap: int) -> int:
    """The one rule of the three ``max_steps``: ``env.max_steps`` is the game's horizon; a section's cap
    (``collect.max_steps``, ``controller.max_steps``) shortens it, 0 keeps it (``runtime.rules`` refuses a
    cap beyond the horizon, so that no value the user gave is silently clipped)."""
    return cap or cfg.env.max_steps


def check_run_config(cfg: Config) -> None:
    """The top-level fields the types cannot say (``ConfigError`` naming the field); the rules across
    sections are in ``runtime.rules``."""
    kind, _, index = cfg.device.partition(":")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name must be a non-empty folder name (no '/'), got {cfg.name!r}")


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the type ``hint`` (converting int to float and str from --set)."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        value = _coerce(value, base, key, source)
        _check_value(value, hint, f"{source}: {key}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping of fields, got {value!r}")
        return _build(hint, value, source, prefix=key + ".")
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(item, item_hint, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e6 (no dot) as a string; accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be of type {hint.__name__}, got {value!r}")
    return value


def _check_value(value: Any, hint: Any, name: str) -> None:
    """Refuse ``value`` outside the ``Bounds`` its type ``hint`` carries (None passes an optional field)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        for arg in typing.get_args(hint):
            if value is not None and arg is not type(None):
                _check_value(value, arg, name)
        return
    if typing.get_origin(hint) is Annotated:
        for bounds in typing.get_args(hint)[1:]:
            if isinstance(bounds, Bounds) and not bounds.holds(value):
                raise ConfigError(f"{name} must be {bounds}, got {value!r}")


def check_bounds(section: Any, prefix: str) -> None:
    """Refuse a field of the config section ``section`` (a dataclass; its nested sections too) outside the
    ``Bounds`` in its type (``ConfigError`` naming ``<prefix>.<field>``): the loader checks every config it
    reads, and the models, envs and policies call this for sections built in code."""
    hints = typing.get_type_hints(type(section), include_extras=True)
    for item in dataclasses.fields(section):
        value, name = getattr(section, item.name), f"{prefix}.{item.name}" if prefix else item.name
        if dataclasses.is_dataclass(value):
            check_bounds(value, name)
        else:
            _check_value(value, hints[item.name], name)


def _build(cls: type, values: dict, source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s} "
            f"(known keys of {prefix.rstrip('.') or 'the config'}: {', '.join(sorted(known))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name, source) for name, value in values.items()}
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict:
    """The config as plain dicts, lists and scalars (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(config)


def config_from_dict(values: dict, source: str = "<dict>") -> Config:
    return _build(Config, values, source)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c), with c parsed as a YAML scalar (so 3, 0.5, true, null, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set memory.components=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: cannot parse value: {error}") from None
    return key.split("."), value


def _merge_override(values: dict, path: list[str], value: Any, cls: type, text: str) -> None:
    """Put ``value`` at ``path`` in ``values``, checking each part of the path against the dataclasses."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    head, rest = path[0], path[1:]
    if head not in names:
        prefix = ".".join(text.split("=", 1)[0].split(".")[: -len(path)] or [])
        where = prefix or "the config"
        raise ConfigError(
            f"--set {text!r}: unknown key {head!r} in {where} (known: {', '.join(sorted(names))})"
        )
    hint = typing.get_type_hints(cls)[head]
    if rest:
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"--set {text!r}: {head!r} is a value, not a section")
        sub = values.setdefault(head, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"--set {text!r}: {head!r} is not a mapping in the config file")
        _merge_override(sub, rest, value, hint, text)
    else:
        values[head] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (the embedded tiny one when ``path`` is None) and apply ``--set`` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        _merge_override(values, keys, value, Config, text)
    source = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
    return _build(Config, values, source)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from frmdn_worldmodels.runtime.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The doc line under each field of the dataclass ``cls`` (and of its bases), read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for statement, following in zip(body, body[1:]):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def describe_fields(sections: Sequence[str]) -> list[str]:
    """``section.field = default`` and its doc, for every field of each of ``sections`` of ``Config``
    (``run``: its top-level fields; a nested section, such as ``speech.memory``, field by field): what
    ``run.py <command> --help`` lists."""
    defaults = Config()
    return [
        line
        for section in sections
        for line in _describe(
            defaults if section == "run" else getattr(defaults, section), section != "run", section
        )
    ]


def _accepts(hint: Any) -> str:
    """What a field's type accepts, for ``--help``: its choices or its range ("": any value of its type)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return "".join(_accepts(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return f"  (one of: {', '.join(typing.get_args(hint))})"
    if typing.get_origin(hint) is Annotated:
        return "".join(f"  ({bounds})" for bounds in typing.get_args(hint)[1:] if isinstance(bounds, Bounds))
    if typing.get_origin(hint) is list and (item := _accepts(typing.get_args(hint)[0])):
        return item.replace("  (", "  (each ", 1)
    return ""


def _describe(value: Any, nested: bool, prefix: str) -> list[str]:
    docs, hints, lines = field_docs(type(value)), typing.get_type_hints(type(value), include_extras=True), []
    for item in dataclasses.fields(value):
        default, name = getattr(value, item.name), f"{prefix}.{item.name}" if nested else item.name
        if dataclasses.is_dataclass(default):
            if nested:  # the top level's sections are listed by the commands that read them
                lines += _describe(default, True, name)
            continue
        listed = _accepts(hints[item.name])
        lines.append(f"  {name} = {default!r}{listed}")
        lines += textwrap.wrap(
            docs.get(item.name, ""), 104, initial_indent="      ", subsequent_indent="      "
        )
    return lines
