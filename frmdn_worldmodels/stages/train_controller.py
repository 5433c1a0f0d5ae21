"""``python run.py train-controller [--in dream|real]``: evolve the controller C with CMA-ES.

Each generation: ``ask`` P candidates, score each by its mean return over ``controller.rollouts`` episodes,
``tell``. The episodes are dreams of the trained memory (``--in dream``: the whole population in one batched
tensor program, ``dream.batched``) or real games played by Ray actors (``--in real``: V + M + C agents,
``agent.workers``). Every ``controller.eval_every`` generations (and after the last) the generation's best
candidate (``controller.keep: mean``: CMA-ES's mean) is scored on ``controller.eval_episodes`` fresh episodes
in the same place; the best scored one so far is kept in ``best.pt``.

Outputs in ``<run>/controller/``: ``es_state.pt`` (the ES state as plain data, written after every generation:
a killed run resumes there and continues exactly as if uninterrupted; it also keeps every periodic
evaluation's champion, the controllers ``run.py fidelity`` scores from several generations), ``best.pt``
(controller parameters, its score and generation), ``metrics.jsonl`` (per generation: best/mean/worst
fitness, sigma, seconds), ``fitness.png`` and ``summary.json``. A finished run is skipped; raising
``controller.generations`` continues it.

Episodes are seeded from (``seed``, generation), so the same config gives the same run.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frmdn_worldmodels.agent.play import Episode, controller_for
from frmdn_worldmodels.agent.workers import chunk_count, map_seeds, run_pool
from frmdn_worldmodels.data.episodes import list_npz, load_latents
from frmdn_worldmodels.dream.batched import BatchedDream
from frmdn_worldmodels.dream.env import (
    critic_files,
    dream_horizon,
    dream_pessimism,
    dream_starts,
    load_memory,
    steps_left,
)
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import (
    Config,
    ControllerConfig,
    step_limit,
)
from frmdn_worldmodels.runtime.io import (
    DataError,
    append_jsonl,
    atomic_write_text,
    load_checkpoint,
    read_json,
    read_jsonl,
    save_checkpoint,
    write_json,
)
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.plots import plot_curves
from frmdn_worldmodels.runtime.pool import PoolKeeper
from frmdn_worldmodels.runtime.progress import note, progress
from frmdn_worldmodels.runtime.records import Stage, file_digest
from frmdn_worldmodels.runtime.rules import check_rules
from frmdn_worldmodels.runtime.seeds import seed_ints
from frmdn_worldmodels.train.imitate import Imitation, imitate_collected, imitation_loss

if typing.TYPE_CHECKING:  # cma takes a second to import, which the config check must not pay
    from frmdn_worldmodels.train.es import CMAES

DREAM_ONLY_FIELDS = ("temperature", "dream_start", "dream_start_limit", "dream_threads", "eval_real_episodes")
"""Controller fields read only when candidates are scored in the dream (``train_in: dream``)."""


def unused_in_real(cfg: Config) -> list[str]:
    """``controller.<field>=<value>`` of each dream-only field set away from its default, when candidates are
    scored in the real game: this stage does not read them (a dream config run with ``--in real``, the
    reference row, keeps its dream settings for the other stages, so they are named rather than refused)."""
    if cfg.controller.train_in != "real":
        return []
    defaults = ControllerConfig()
    return [
        f"controller.{name}={getattr(cfg.controller, name)!r}"
        for name in DREAM_ONLY_FIELDS
        if getattr(cfg.controller, name) != getattr(defaults, name)
    ]


def search_seed(cfg: Config) -> int:
    """``controller.seed``, or the run's ``seed`` without one."""
    return cfg.seed if cfg.controller.seed is None else cfg.controller.seed


def fitness_seeds(cfg: Config) -> dict[str, int]:
    """The seed of each purpose a fitness draws dreams or episodes for: the search's for ``train``, the run's
    for ``eval`` (replicate searches are scored on the same ones)."""
    return {"train": search_seed(cfg), "eval": cfg.seed}


class DreamFitness:
    """Scores candidates in the batched dream of the memory."""

    def __init__(self, cfg: Config, memory: MemoryModel, controller: Controller):
        latents = run_paths(cfg).latents
        starts = dream_starts(cfg, memory)
        self.seeds = fitness_seeds(cfg)
        self.dream = BatchedDream(
            memory,
            controller,
            starts.mu,
            starts.logvar,
            dream_horizon(cfg),
            cfg.controller.temperature,
            cfg.memory_train.use_mu,
            cfg.controller.dream_threads,
            initial_state=starts.state,
            steps_left=steps_left(cfg, starts),
            pessimism=dream_pessimism(cfg, memory, starts),
        )
        self.pessimism_per_step: float | None = None
        """The last population's mean pessimism a dream step (``controller.pessimism``); None: off."""
        # how long the real episodes went on from where the dreams start (capped at the dream's horizon): from
        # the first frame, the whole episode; from any frame, on average what is left of it. Flags dreams that
        # end far too soon.
        horizon = self.dream.horizon
        lengths = [len(load_latents(path)["rewards"]) for path in list_npz(latents)]
        if cfg.controller.dream_start == "any":
            left = [np.minimum(np.arange(length, 0, -1), horizon).mean() for length in lengths]
            self.real_length = float(np.mean(left))
        else:
            self.real_length = float(np.mean(np.minimum(lengths, horizon)))
        self.warned = False

    def _generator(self, purpose: str, generation: int) -> torch.Generator:
        return torch.Generator(device=self.dream.device).manual_seed(
            seed_ints(self.seeds[purpose], purpose, generation, count=1)[0]
        )

    def population(self, candidates: np.ndarray, rollouts: int, generation: int) -> tuple[np.ndarray, float]:
        """Each candidate's mean return over ``rollouts`` dreams, and the dreams' mean length."""
        params = torch.as_tensor(candidates, dtype=torch.float32)
        result = self.dream.rollout(params, rollouts, self._generator("train", generation))
        mean_length = float(result.lengths.double().mean())
        if result.penalties is not None:
            self.pessimism_per_step = float(result.penalties.sum() / result.lengths.sum().clamp(min=1))
        if mean_length < 0.25 * self.real_length and not self.warned:
            self.warned = True
            print(
                f"train-controller: dreams last {mean_length:.0f} steps on average, the real episodes went "
                f"on for {self.real_length:.0f} from the same frames: the memory's done head ends them "
                "early, so the dream says little about the game (an undertrained memory is the usual cause: "
                "memory_train.epochs)",
                file=sys.stderr,
            )
        return result.fitness.double().numpy(), mean_length

    def episodes(self, params: np.ndarray, count: int, generation: int) -> np.ndarray:
        population = torch.as_tensor(params, dtype=torch.float32).unsqueeze(0)
        return (
            self.dream.rollout(population, count, self._generator("eval", generation))
            .returns[0]
            .double()
            .numpy()
        )

    def close(self) -> None:
        pass


class RealFitness:
    """Scores candidates in the real game with a pool of Ray rollout actors."""

    pessimism_per_step: float | None = None
    """The real game pays no pessimism."""

    def __init__(self, cfg: Config, memory: MemoryModel, keeper: PoolKeeper | None = None):
        """``keeper``: the command's ``PoolKeeper`` (the actors stay up for its next stage)."""
        self.seeds = fitness_seeds(cfg)
        self.envs_per_worker = cfg.controller.envs_per_worker
        self.pool = run_pool(cfg, step_limit(cfg, cfg.controller.max_steps), memory, keeper)

    def population(self, candidates: np.ndarray, rollouts: int, generation: int) -> tuple[np.ndarray, float]:
        """Each candidate's mean return over ``rollouts`` real episodes, and the episodes' mean length."""
        # the same episodes for every candidate
        seeds = seed_ints(self.seeds["train"], "train", generation, count=rollouts)
        played = self.play(candidates, seeds)
        returns = np.array([[episode.ret for episode in row] for row in played])
        return returns.mean(axis=1), float(np.mean([episode.steps for row in played for episode in row]))

    def play(self, candidates: np.ndarray, seeds: list[int], desc: str | None = None) -> list[list[Episode]]:
        """Every candidate of ``candidates [P, n]`` on every one of ``seeds``: [P][len(seeds)] episodes, the
        (candidate, seed) episodes cut into lockstep batches of up to ``envs_per_worker`` episodes; ``desc``:
        a progress bar's name."""
        count = len(seeds)
        owners = np.repeat(np.arange(len(candidates)), count)
        all_seeds = list(seeds) * len(candidates)
        parts = chunk_count(len(all_seeds), self.pool.size, self.envs_per_worker)
        jobs = [
            (np.asarray(candidates[owners[index]], np.float32), [all_seeds[i] for i in index])
            for index in np.array_split(np.arange(len(all_seeds)), parts)
        ]
        sizes = [len(job[1]) for job in jobs] if desc else None
        episodes = [episode for result in self.pool.map("evaluate", jobs, desc, sizes) for episode in result]
        return [episodes[p * count : (p + 1) * count] for p in range(len(candidates))]

    def episodes(self, params: np.ndarray, count: int, generation: int) -> np.ndarray:
        seeds = seed_ints(self.seeds["eval"], "eval", generation, count=count)
        params = np.asarray(params, np.float32)
        episodes = map_seeds(self.pool, "evaluate", params, seeds, self.envs_per_worker)
        return np.array([episode.ret for episode in episodes])

    def close(self) -> None:
        self.pool.close()


def _gap(rows: list[dict], kept_generation: int) -> dict:
    """The dream-vs-real gap: the kept controller's dream and real scores (at the generation it was kept), and
    those of every periodic evaluation that scored the champion in both."""
    scored = [row for row in rows if "real_mean" in row]
    kept = next((row for row in scored if row["generation"] == kept_generation), None)
    if kept is None:
        return {}
    return {
        "gap": {
            "generation": kept["generation"],
            "dream_mean": kept["eval_mean"],
            "real_mean": kept["real_mean"],
            "real_std": kept["real_std"],
            "last": {key: scored[-1][key] for key in ("generation", "eval_mean", "real_mean")},
            "evaluations": [
                {key: row[key] for key in ("generation", "eval_mean", "real_mean")} for row in scored
            ],
        }
    }


def _score_start(
    imitation: Imitation, fitness: DreamFitness | RealFitness, real: RealFitness | None, c: ControllerConfig
) -> dict:
    """The imitation CMA-ES starts from (``controller.init: imitate``): its fit, and its scores at generation
    0 on the periodic evaluation's episodes (the dream's, and the real game's with ``eval_real_episodes``)."""
    params = imitation.params.double().numpy()
    dream = fitness.episodes(params, c.eval_episodes, 0)
    scores = {**imitation.summary(), "eval_mean": float(dream.mean()), "eval_std": float(dream.std())}
    if real is not None:
        returns = real.episodes(params, c.eval_real_episodes, 0)
        scores.update(real_mean=float(returns.mean()), real_std=float(returns.std()))
    return scores


def _plot(path, rows: list[dict], start: dict | None, train_in: str, imitate_weight: float = 0.0) -> None:
    """The fitness curves; ``start``: the imitation's scores, drawn at generation 0; ``train_in``: where the
    candidates were scored (``dream`` or ``real``); ``imitate_weight`` > 0: the fitness is the return less
    that weight x the imitation loss, a scale of its own, so the best candidate's returns (dream and real)
    get the right-hand axis."""
    generations = [row["generation"] for row in rows]
    series = {name: (generations, [row[name] for row in rows]) for name in ("best", "mean", "worst")}
    returns = {}
    evaluations = [{"generation": 0, **start}, *rows] if start else rows
    scored = [row for row in evaluations if "eval_mean" in row]
    if scored:
        where = "dream" if train_in == "dream" else "real game"
        returns[f"best candidate, {where} (more episodes)"] = (
            [r["generation"] for r in scored],
            [r["eval_mean"] for r in scored],
        )
    real = [row for row in evaluations if "real_mean" in row]
    if real:  # the dream-vs-real gap: the same candidate in the real game
        returns["best candidate, real game"] = (
            [r["generation"] for r in real],
            [r["real_mean"] for r in real],
        )
    ylabel, scales = "fitness (mean return)", {}
    if imitate_weight > 0:
        ylabel = f"fitness (mean return - {imitate_weight:g} x imitation loss)"
        scales = {"right": returns, "right_label": "best candidate's mean return"}
    else:
        series.update(returns)
    plot_curves(path, series, xlabel="generation", ylabel=ylabel, title="CMA-ES", integer_x=True, **scales)


@dataclass
class Search:
    """CMA-ES between generations: what ``es_state.pt`` holds."""

    es: CMAES
    best: dict
    """The best periodically evaluated candidate so far: ``score``, ``std``, ``generation``, ``params``."""
    champions: list[dict]
    """Every periodic evaluation's champion: ``generation``, ``params`` (``run.py fidelity`` scores them)."""

    def save(self, path: Path) -> None:
        save_checkpoint(path, es=self.es.state_dict(), best=self.best, champions=self.champions)


def _resume_or_start(cfg: Config, state_path: Path, x0: Callable[[], np.ndarray]) -> Search:
    """The search ``es_state.pt`` saved, or a new one from ``x0()`` (called only then)."""
    from frmdn_worldmodels.train.es import CMAES

    if state_path.exists():
        state = load_checkpoint(state_path)
        return Search(CMAES.from_state_dict(state["es"]), state["best"], state.get("champions", []))
    c = cfg.controller
    es = CMAES(x0(), c.sigma, c.population, search_seed(cfg), diagonal=c.covariance == "diagonal")
    return Search(es, {"score": -float("inf"), "std": 0.0, "generation": 0, "params": None}, [])


class Penalty:
    """``controller.imitate_weight`` times a candidate's imitation loss (zeros without an imitation)."""

    def __init__(self, imitation: Imitation | None, controller: Controller, weight: float):
        self.imitation, self.controller, self.weight = imitation, controller, weight

    def __call__(self, population: np.ndarray) -> np.ndarray:
        """[P] the penalties of ``population [P, n]``."""
        if self.imitation is None or self.weight == 0:
            return np.zeros(len(population))
        with torch.no_grad():
            params = torch.as_tensor(population, dtype=torch.float32)
            losses = imitation_loss(self.controller, params, self.imitation.features, self.imitation.target)
        return self.weight * losses.double().numpy()


def _generation(
    cfg: Config,
    search: Search,
    fitness: DreamFitness | RealFitness,
    real: RealFitness | None,
    penalty: Penalty,
    controller: Controller,
    best_path: Path,
) -> dict:
    """One generation: ask, score, tell; every ``controller.eval_every`` generations (and at the last) the
    champion (the best-ranked candidate, or CMA-ES's new mean with ``controller.keep: mean``) scored on fresh
    episodes, and kept in ``best.pt`` when it beats the best so far. Returns the metrics row."""
    c, es = cfg.controller, search.es
    candidates = es.ask()
    dream_returns, mean_length = fitness.population(candidates, c.rollouts, es.generation)
    penalties = penalty(candidates)
    scores = dream_returns - penalties
    es.tell(candidates, scores)
    generation = es.generation
    row = {
        "generation": generation,
        "best": float(scores.max()),
        "mean": float(scores.mean()),
        "worst": float(scores.min()),
        "sigma": es.sigma,
        "mean_length": mean_length,
    }
    if c.imitate_weight:
        row.update(return_mean=float(dream_returns.mean()), penalty_mean=float(penalties.mean()))
    if fitness.pessimism_per_step is not None:
        row["pessimism_per_step"] = fitness.pessimism_per_step
    if not ((c.eval_every and generation % c.eval_every == 0) or generation == c.generations):
        return row
    champion = es.mean if c.keep == "mean" else candidates[int(np.argmax(scores))]
    search.champions.append(
        {"generation": generation, "params": torch.as_tensor(champion, dtype=torch.float32)}
    )
    returns = fitness.episodes(champion, c.eval_episodes, generation)
    row.update(eval_mean=float(returns.mean()), eval_std=float(returns.std()))
    # what the champion is kept by: its dream score less its imitation penalty
    row["eval_score"] = row["eval_mean"] - float(penalty(champion[None])[0])
    if real is not None:
        real_returns = real.episodes(champion, c.eval_real_episodes, generation)
        row.update(real_mean=float(real_returns.mean()), real_std=float(real_returns.std()))
    if row["eval_score"] > search.best["score"]:
        params = torch.as_tensor(champion, dtype=torch.float32)
        search.best = {
            "score": row["eval_score"],
            "std": row["eval_std"],
            "generation": generation,
            "params": params,
        }
        save_checkpoint(
            best_path,
            params=params,
            controller=controller.to_dict(),
            fitness=row["eval_score"],
            fitness_std=row["eval_std"],
            generation=generation,
            episodes=c.eval_episodes,
            train_in=c.train_in,
            temperature=c.temperature,
        )
    return row


def _summary(cfg: Config, search: Search, rows: list[dict], controller: Controller, extra: dict) -> dict:
    """The stage's summary (``extra``: its files, timing and start scores)."""
    c, es, best = cfg.controller, search.es, search.best
    in_dream = c.train_in == "dream"
    return {
        "train_in": c.train_in,
        "generations": es.generation,
        "population": c.population,
        "rollouts": c.rollouts,
        "num_params": controller.num_params,
        "temperature": c.temperature if in_dream else None,
        "dream_start": c.dream_start if in_dream else None,
        "dream_horizon": dream_horizon(cfg) if in_dream else None,
        "best_score": best["score"],
        "imitate_weight": c.imitate_weight if c.init == "imitate" else None,
        "best_score_std": best["std"],
        "best_generation": best["generation"],
        "best_score_episodes": c.eval_episodes,
        **_gap(rows, best["generation"]),
        "last_mean_fitness": rows[-1]["mean"],
        "last_mean_length": rows[-1].get("mean_length"),
        "first_mean_fitness": rows[0]["mean"],
        "sigma": es.sigma,
        **extra,
        "seconds_per_generation": round(float(np.mean([row["seconds"] for row in rows])), 3),
        "cma_stop": es.stop_reasons(),
    }


def _stage_inputs(cfg: Config, controller: Controller, initial_mean: np.ndarray | None) -> dict | None:
    """The stage's extra inputs: the digest of ``initial_mean`` (refused unless it fits ``controller``) and,
    with pessimism, of the critics' weights."""
    inputs = {}
    if initial_mean is not None:
        if np.shape(initial_mean) != (controller.num_params,):
            raise DataError(
                f"the initial CMA-ES mean has shape {np.shape(initial_mean)}, "
                f"the controller {controller.num_params} parameters"
            )
        inputs["initial_mean"] = hashlib.sha256(np.asarray(initial_mean, np.float64).tobytes()).hexdigest()
    if cfg.controller.pessimism and cfg.controller.train_in == "dream":
        for i, path in enumerate(critic_files(cfg), start=1):
            inputs[f"critic_{i}"] = file_digest(path)
    return inputs or None


def run(cfg: Config, *, initial_mean: np.ndarray | None = None, keeper: PoolKeeper | None = None) -> dict:
    """Evolve the controller where ``controller.train_in`` says; resumes from ``es_state.pt``.

    ``initial_mean``: where CMA-ES starts (iterative training continues from the previous iteration's mean)
    instead of the controller's initial parameters; one of the stage's inputs. ``keeper``: the command's
    ``PoolKeeper``, for the real-game rollout actors."""
    check_rules(cfg, "controller")
    c = cfg.controller
    if unused := unused_in_real(cfg):
        note(f"train-controller: candidates are scored in the real game; unused here: {', '.join(unused)}")
    memory = load_memory(cfg)
    controller = controller_for(cfg.env, memory, c)
    # the stage's folder holds only work made from this memory (and its critics), these latents and settings
    stage = Stage(cfg, "train-controller", inputs=_stage_inputs(cfg, controller, initial_mean))
    if (finished := stage.open()) is not None:
        return {**finished, "skipped": True}
    out = stage.folder
    state_path, best_path, metrics_path = out / "es_state.pt", out / "best.pt", out / "metrics.jsonl"
    start_path, imitation = out / "start.json", None
    start = controller.initial_params(torch.Generator().manual_seed(search_seed(cfg)))  # W1 (hidden > 0)
    starts_from_imitation = c.init == "imitate" and initial_mean is None and not state_path.exists()
    if starts_from_imitation or (c.init == "imitate" and c.imitate_weight > 0):
        # the fit is deterministic: a resumed run penalises candidates against the same imitation
        imitation = imitate_collected(cfg, memory, controller, start)

    def x0() -> np.ndarray:
        if initial_mean is not None:
            return np.asarray(initial_mean, np.float64)
        return (imitation.params if imitation is not None else start).double().numpy()

    search = _resume_or_start(cfg, state_path, x0)
    penalty = Penalty(imitation, controller, c.imitate_weight)
    # rows of generations after the checkpoint were written by a run killed before it saved the ES state
    rows = [row for row in read_jsonl(metrics_path) if row["generation"] <= search.es.generation]
    atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in rows))
    fitness = real = None
    if search.es.generation < c.generations:
        in_dream = c.train_in == "dream"
        fitness = DreamFitness(cfg, memory, controller) if in_dream else RealFitness(cfg, memory, keeper)
        if in_dream and c.eval_real_episodes:
            real = RealFitness(cfg, memory, keeper)  # the dream-vs-real gap, never used to rank
        if starts_from_imitation and not start_path.exists():
            write_json(start_path, _score_start(imitation, fitness, real, c))
    started = time.perf_counter()
    bar = progress(
        total=c.generations, initial=search.es.generation, desc=f"train-controller ({c.train_in})", unit="gen"
    )
    try:
        while search.es.generation < c.generations:
            tick = time.perf_counter()
            row = _generation(cfg, search, fitness, real, penalty, controller, best_path)
            row["seconds"] = round(time.perf_counter() - tick, 3)
            append_jsonl(metrics_path, row)
            search.save(state_path)
            stage.record_progress()
            rows.append(row)
            bar.update(1)
            bar.set_postfix(
                best=f"{row['best']:.1f}", mean=f"{row['mean']:.1f}", sigma=f"{search.es.sigma:.3f}"
            )
    finally:
        bar.close()
        for scorer in (fitness, real):
            if scorer is not None:
                scorer.close()
    start_scores = read_json(start_path) if start_path.exists() else None
    _plot(out / "fitness.png", rows, start_scores, c.train_in, c.imitate_weight)
    seconds = round(time.perf_counter() - started, 2)
    extra = {"seconds_this_session": seconds, "best": str(best_path), "start": start_scores}
    return stage.finish(_summary(cfg, search, rows, controller, extra))


def load_best(cfg: Config) -> dict:
    """``<run>/controller/best.pt``: params, controller shape and score (raises ``DataError`` when
    missing)."""
    path = run_paths(cfg).controller / "best.pt"
    if not path.exists():
        raise DataError(f"{path}: no trained controller; run `python run.py train-controller` first")
    payload = load_checkpoint(path)
    if "params" not in payload or "controller" not in payload:
        raise DataError(f"{path}: not a controller checkpoint (needs params and controller)")
    return payload
