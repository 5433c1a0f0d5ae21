r"""``python run.py fidelity``: how well the memory's dream ranks controllers the way the real game does.

A fixed, seeded set of controllers (flat parameter vectors of ``controller_for(env, memory, c)``):

- ``kept``: the controller of ``<run>/controller/best.pt``;
- ``generation``: the best candidate of every periodic evaluation of the CMA-ES run (``es_state.pt``'s
  champions: the search's path from its start to the kept controller);
- ``start``: where CMA-ES started, the controller's initial parameters (seeded by ``seed``, as
  ``train-controller`` draws them) and, with ``controller.init: imitate``, the imitation of the collected
  play (``train.imitate.imitate_collected``: a deterministic fit, so the very start of the run);
- ``perturbed``: :math:`\theta + s \, \mathrm{rms}(\theta) \, \epsilon`, :math:`\epsilon \sim N(0, I)`, around
  the kept :math:`\theta`, at the relative scales ``PERTURBATION_SCALES``;
- ``random``: :math:`N(0, s^2 I)` at the scales ``RANDOM_SCALES``; and ``zeros``.

``fidelity.controllers`` perturbed and random ones are dealt in turn over those scales; a vector already in
the set is not scored twice (the linear controller's initial parameters are the zeros). The teacher that
collected the data (CarRacing's road follower, Mario's RAM expert) is not in the set: it reads pixels or the
game's RAM, not [z, h], so it cannot act in the dream; its imitation stands for it.

Every controller is scored in the dream by the run's own ``DreamFitness`` (all of them in one batch from the
same ``fidelity.dreams`` start frames and generator seed) and in the real game on ``RealFitness``'s rollout
pool, every controller on the same ``fidelity.real_episodes`` seeds: both capped at the controller's training
horizon (``controller.max_steps``), the dream at ``controller.temperature``, the conditions CMA-ES ranked its
candidates in. Per controller: the mean, std and standard error :math:`s / \sqrt{n}` (:math:`s` with
:math:`n - 1`) of its returns in each. Overall: Spearman's :math:`\rho` of the dream means against the real
means (Pearson's r of their average ranks, ``spearman``), Pearson's r of the means themselves, and the mean
gap dream - real.

Outputs in ``<run>/fidelity/``: ``fidelity.json`` (all of it, the seeds included), ``fidelity.png`` (real mean
against dream mean with standard-error bars, y = x, coloured by kind) and ``summary.json``. A finished
measurement is skipped; one made from another memory, controller or setting is redone
(``frmdn_worldmodels.runtime.records``).

The settings are the config's ``fidelity`` section.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from frmdn_worldmodels.agent.play import Episode, controller_for
from frmdn_worldmodels.dream.batched import DreamRollouts
from frmdn_worldmodels.dream.env import load_memory
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import Config, FidelityConfig, step_limit
from frmdn_worldmodels.runtime.io import load_checkpoint, write_json
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.plots import plot_scatter
from frmdn_worldmodels.runtime.records import Stage
from frmdn_worldmodels.runtime.seeds import seed_ints
from frmdn_worldmodels.stages.evaluate import _controller, _stats
from frmdn_worldmodels.stages.train_controller import DreamFitness, RealFitness, load_best
from frmdn_worldmodels.train.imitate import imitate_collected

REAL, DREAM, SET = 0, 1, 2
"""What each of the measurement's seeds draws: the real episodes, the dreams, the perturbed and random
controllers."""
PERTURBATION_SCALES = (0.02, 0.05, 0.1, 0.2, 0.4)
"""Std of the perturbations of the kept controller, relative to the rms of its parameters."""
RANDOM_SCALES = (0.1, 1.0)
"""Std of the random controllers' parameters (0.1: ``controller.sigma``'s default, CMA-ES's first steps)."""


def fidelity_seeds(cfg: Config, settings: FidelityConfig, use: int, count: int) -> list[int]:
    """``count`` seeds for one ``use`` (``REAL``, ``DREAM``, ``SET``), from the run's and the measurement's
    seeds."""
    return seed_ints(cfg.seed, "fidelity", settings.seed, use, count=count)


@dataclass(frozen=True)
class Member:
    """One controller of the set."""

    name: str
    kind: str
    """``kept``, ``start``, ``perturbed``, ``random`` or ``zeros`` (the figure's colours)."""
    params: np.ndarray
    """[n] float32."""


def controller_set(
    cfg: Config,
    settings: FidelityConfig,
    memory: MemoryModel,
    controller: Controller,
    best: dict,
    champions: list[dict],
) -> list[Member]:
    """The kept controller, the CMA-ES start(s), the periodic evaluations' ``champions``,
    ``settings.controllers`` perturbed and random ones, and the zeros (see the module docstring), each vector
    once."""
    kept = best["params"].double().numpy()
    start = controller.initial_params(torch.Generator().manual_seed(cfg.seed))  # as train-controller's
    members = [
        (f"kept (generation {best.get('generation')})", "kept", kept),
        ("initial", "start", start.double().numpy()),
    ]
    if cfg.controller.init == "imitate":
        members.append(("imitation", "start", imitate_collected(cfg, memory, controller, start).params))
    for champion in champions:
        members.append(
            (f"generation {champion['generation']} best", "generation", champion["params"].numpy())
        )
    rng = np.random.default_rng(fidelity_seeds(cfg, settings, SET, 1)[0])
    rms = float(np.sqrt(np.mean(kept**2))) or 1.0
    groups = [("perturbed", s) for s in PERTURBATION_SCALES] + [("random", s) for s in RANDOM_SCALES]
    for index in range(settings.controllers):
        kind, scale = groups[index % len(groups)]
        number = index // len(groups) + 1
        noise = rng.standard_normal(controller.num_params)
        if kind == "perturbed":
            members.append((f"kept + {scale:g} rms noise #{number}", kind, kept + scale * rms * noise))
        else:
            members.append((f"N(0, {scale:g}^2) #{number}", kind, scale * noise))
    members.append(("zeros", "zeros", np.zeros(controller.num_params)))
    chosen: list[Member] = []
    for name, kind, params in members:
        params = np.asarray(params, dtype=np.float32)
        if not any(np.array_equal(params, other.params) for other in chosen):
            chosen.append(Member(name, kind, params))
    return chosen


def load_champions(cfg: Config) -> list[dict]:
    """The best candidate of each periodic evaluation of the run's CMA-ES (``generation``, ``params``), from
    its ``es_state.pt`` (none from a run made before it kept them)."""
    path = run_paths(cfg).controller / "es_state.pt"
    return load_checkpoint(path).get("champions", []) if path.exists() else []


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``; tied values share the mean of the ranks they span (``[1, 2, 2, 3]`` ->
    ``[1, 2.5, 2.5, 4]``)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"ranks of non-finite values: {values}")
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the rank of each distinct value's last copy
    return (last - (counts - 1) / 2.0)[inverse]


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    r""":math:`r = \sum (x - \bar x)(y - \bar y) / \sqrt{\sum (x - \bar x)^2 \sum (y - \bar y)^2}`; None
    when undefined (fewer than two points, or a constant x or y)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"pearson of {len(x)} and {len(y)} values")
    dx, dy = x - x.mean(), y - y.mean()
    scale = np.sqrt((dx**2).sum() * (dy**2).sum())
    if len(x) < 2 or scale == 0:
        return None
    return float(np.clip((dx * dy).sum() / scale, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation: Pearson's r of the average ranks (``average_ranks``); None when
    undefined."""
    return pearson(average_ranks(x), average_ranks(y))


def _scores(returns: np.ndarray) -> dict:
    """Mean, std (of the population), min, max and the returns (``stages.evaluate._stats``), and the mean's
    standard error s / sqrt(n), s with n - 1."""
    returns = np.asarray(returns, dtype=np.float64)
    return {**_stats(returns), "se": float(returns.std(ddof=1) / np.sqrt(len(returns)))}


def scored_set(cfg: Config, memory: MemoryModel, best: dict) -> tuple[Controller, list[Member]]:
    """The run's controller shape (checked against ``best.pt``) and the set of controllers it measures."""
    controller = controller_for(cfg.env, memory, cfg.controller)
    _controller(controller, best, run_paths(cfg).controller / "best.pt")
    return controller, controller_set(cfg, cfg.fidelity, memory, controller, best, load_champions(cfg))


def dream_set(
    cfg: Config, memory: MemoryModel, controller: Controller, members: list[Member], adjust=None
) -> tuple[DreamRollouts, int]:
    """Every member of the set in the run's batched dream, on the measurement's dreams (``adjust(dream)``
    first changes the ``DreamFitness``, for an ablation), and the dreams' generator seed."""
    dream = DreamFitness(cfg, memory, controller)
    if adjust is not None:
        adjust(dream)
    seed = fidelity_seeds(cfg, cfg.fidelity, DREAM, 1)[0]
    generator = torch.Generator(device=dream.dream.device).manual_seed(seed)
    params = torch.as_tensor(np.stack([member.params for member in members]))
    return dream.dream.rollout(params, cfg.fidelity.dreams, generator), seed


def score_rows(members: list[Member], dreamt: DreamRollouts, played: list[list[Episode]]) -> list[dict]:
    """Per controller of the set: its name and kind, the scores of its returns (``_scores``) in the dream
    with the dreams' mean length, and in the real game with the episodes' mean steps and seeds."""
    rows = []
    for index, member in enumerate(members):
        episodes = played[index]
        rows.append(
            {
                "name": member.name,
                "kind": member.kind,
                "dream": {
                    **_scores(dreamt.returns[index].double().cpu().numpy()),
                    "mean_length": float(dreamt.lengths[index].double().mean()),
                },
                "real": {
                    **_scores(np.array([episode.ret for episode in episodes])),
                    "mean_steps": float(np.mean([episode.steps for episode in episodes])),
                    "seeds": [episode.seed for episode in episodes],
                },
            }
        )
    return rows


def finished(cfg: Config) -> dict | None:
    """The summary of the run's measurement if it is finished and made from the run's memory and controller
    as they are now, with the config's settings; no side effects (the report's)."""
    return Stage(cfg, "fidelity").done()


def run(cfg: Config) -> dict:
    """Score the set of controllers in the dream and in the real game (see the module docstring)."""
    settings = cfg.fidelity
    best = load_best(cfg)  # a DataError naming best.pt if there is no controller yet
    stage = Stage(cfg, "fidelity")
    if (done := stage.open()) is not None:  # the same controllers scored the same way already
        return {**done, "skipped": True}
    out = stage.folder
    started = time.perf_counter()
    memory = load_memory(cfg)
    controller, members = scored_set(cfg, memory, best)
    params = np.stack([member.params for member in members])
    dreamt, dream_seed = dream_set(cfg, memory, controller, members)
    real_seeds = fidelity_seeds(cfg, settings, REAL, settings.real_episodes)
    real = RealFitness(cfg, memory)
    try:
        played = real.play(params, real_seeds, "[fidelity] real game")
    finally:
        real.close()

    rows = score_rows(members, dreamt, played)
    dream_means = np.array([row["dream"]["mean"] for row in rows])
    real_means = np.array([row["real"]["mean"] for row in rows])
    rho, r = spearman(dream_means, real_means), pearson(dream_means, real_means)
    kept = rows[0]  # the set starts with the kept controller
    summary = {
        "env": cfg.env.name,
        "controllers": len(rows),
        "dreams": settings.dreams,
        "real_episodes": settings.real_episodes,
        "spearman": rho,
        "pearson": r,
        "mean_gap": float((dream_means - real_means).mean()),
        "temperature": cfg.controller.temperature,
        "trained_temperature": best.get("temperature"),
        "horizon": step_limit(cfg, cfg.controller.max_steps),
        # how long the dreams and the real episodes went on (dreams ended far too soon say little of the game)
        "dream_mean_length": float(dreamt.lengths.double().mean()),
        "real_mean_steps": float(np.mean([row["real"]["mean_steps"] for row in rows])),
        "kept": {
            "dream_mean": kept["dream"]["mean"],
            "real_mean": kept["real"]["mean"],
            # 1 = the best of the set; average ranks for ties
            "dream_rank": float(len(rows) + 1 - average_ranks(dream_means)[0]),
            "real_rank": float(len(rows) + 1 - average_ranks(real_means)[0]),
        },
        "seconds": round(time.perf_counter() - started, 2),
        "json": str(out / "fidelity.json"),
        "figure": str(out / "fidelity.png"),
    }
    write_json(
        out / "fidelity.json",
        {
            **summary,
            "seed": cfg.seed,
            "settings": asdict(settings),
            "dream_seed": dream_seed,
            "dream_starts": [int(start) for start in dreamt.starts],
            "real_seeds": real_seeds,
            "rows": rows,
        },
    )
    _plot(out / "fidelity.png", rows, rho)
    shown = "undefined" if rho is None else f"{rho:.3f}"
    print(
        f"fidelity: Spearman {shown} between dream and real means of {len(rows)} controllers "
        f"({settings.dreams} dreams, {settings.real_episodes} real episodes each); dream - real "
        f"{summary['mean_gap']:+.2f} on average; {out / 'fidelity.png'}",
        file=sys.stderr,
    )
    return stage.finish(summary)


def _plot(path, rows: list[dict], rho: float | None) -> None:
    """Real mean against dream mean with standard-error bars, one colour per kind, and y = x."""
    groups = {}
    kinds = dict.fromkeys(row["kind"] for row in rows)
    for kind in sorted(kinds, key=lambda kind: kind == "kept"):  # the kept controller drawn last, on top
        chosen = [row for row in rows if row["kind"] == kind]
        dream, real = [row["dream"] for row in chosen], [row["real"] for row in chosen]
        groups[kind] = (
            [d["mean"] for d in dream],
            [r["mean"] for r in real],
            [d["se"] for d in dream],
            [r["se"] for r in real],
        )
    shown = "undefined" if rho is None else f"{rho:.2f}"
    plot_scatter(
        path,
        groups,
        xlabel="dream mean return (± SE)",
        ylabel="real mean return (± SE)",
        title=f"dream vs real game: Spearman ρ = {shown} ({len(rows)} controllers)",
        diagonal=True,
    )
