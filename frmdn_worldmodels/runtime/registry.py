"""The one registry of commands: what each runs, the config sections it reads, its folder in the run, what its
output depends on, and its place in the pipeline.

``cli.py`` builds its commands from it, ``runtime.records`` its stale checks, ``stages.report`` its sections.
A stage's code is named by ``"module:function"`` and imported only when the command runs, so
``run.py collect`` never pays for importing the benchmarks, and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """What one stage's output depends on (its ``made_from.json``)."""

    settings: tuple[str, ...]
    """Config fields or sections (dotted) its output depends on."""
    upstream: tuple[str, ...] = ()
    """Stages whose output it reads."""
    outputs: tuple[str, ...] = ()
    """Files of its folder that identify its output (a ``*`` pattern: by names and sizes; else by content)."""
    neutral: tuple[str, ...] = ()
    """Fields inside ``settings`` that change no result."""
    extendable: tuple[str, ...] = ()
    """Fields inside ``settings`` whose larger value continues the finished stage."""


@dataclass(frozen=True)
class Command:
    """One command of ``run.py``."""

    name: str
    run: str
    """``"module:function"``: takes the resolved ``Config``, returns the command's summary dict."""
    help: str
    sections: tuple[str, ...]
    """Config sections it reads besides the top-level fields; their checks run before any work."""
    folder: str | None = None
    """Its folder in the run: an attribute of ``runtime.paths.RunPaths``."""
    record: StageSpec | None = None
    """What its output depends on; None: it keeps no ``made_from.json``."""
    pipeline: bool = False
    """A stage of ``run.py pipeline`` (in this registry's order)."""
    plays: bool = False
    """Plays real episodes on Ray's rollout actors: its run takes the command's ``runtime.pool.PoolKeeper``
    (``keeper=``), so the stages of one command reuse the actors instead of starting new ones."""
    final: bool = False
    """Scores or shows the final controller: after iterative training it reads the last iteration, and its
    time is outside a config's training budget."""


_ROLLOUT_NEUTRAL = (
    "controller.workers",
    "controller.retries",
    "controller.envs_per_worker",
    "controller.job_timeout",
)

COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command(
            "collect",
            "frmdn_worldmodels.stages.collect:run",
            "collect real-game episodes in parallel on Ray",
            ("env", "collect"),
            "episodes",
            StageSpec(
                ("seed", "env", "collect"),
                outputs=("ep_*.npz",),
                neutral=("collect.workers", "collect.retries", "collect.episode_timeout"),
                extendable=("collect.episodes",),
            ),
            pipeline=True,
        ),
        Command(
            "train-vae",
            "frmdn_worldmodels.stages.train_vae:run",
            "train the ConvVAE (V) on the collected frames",
            ("vae",),
            "vae",
            StageSpec(
                ("seed", "vae"),
                upstream=("collect",),
                outputs=("vae.pt",),
                neutral=("vae.checkpoint_every", "vae.log_every", "vae.encode_batch"),
                extendable=("vae.epochs",),
            ),
            pipeline=True,
        ),
        Command(
            "encode",
            "frmdn_worldmodels.stages.encode:run",
            "encode every episode to latents with the trained VAE",
            ("vae",),
            "latents",
            StageSpec((), upstream=("collect", "train-vae"), outputs=("ep_*.npz",)),
            pipeline=True,
        ),
        Command(
            "train-memory",
            "frmdn_worldmodels.stages.train_memory:run",
            "train the FRMDN/RMDN memory (M)",
            ("memory", "memory_train"),
            "memory",
            StageSpec(
                ("seed", "memory", "memory_train"),
                upstream=("encode",),
                outputs=("memory.pt",),
                neutral=(
                    "memory_train.checkpoint_every",
                    "memory_train.log_every",
                    "memory_train.sweep_kinds",
                    "memory_train.sweep_components",
                    "memory_train.sweep_ranks",
                    "memory_train.sweep_seeds",
                    "memory_train.sweep_extra",
                    "memory_train.critics",  # each critic is a stage of its own, in memory/critics/
                ),
                extendable=("memory_train.epochs",),
            ),
            pipeline=True,
        ),
        Command(
            "train-controller",
            "frmdn_worldmodels.stages.train_controller:run",
            "evolve the controller (C) with CMA-ES",
            ("env", "memory", "controller"),
            "controller",
            StageSpec(
                ("seed", "env", "controller", "memory_train.use_mu"),
                upstream=("encode", "train-vae", "train-memory"),
                outputs=("best.pt",),
                neutral=_ROLLOUT_NEUTRAL,
                extendable=("controller.generations",),
            ),
            pipeline=True,
            plays=True,
        ),
        Command(
            "iterate",
            "frmdn_worldmodels.stages.iterate:run",
            "iterative training: collect with the best controller, train M further, continue CMA-ES",
            ("env", "collect", "vae", "memory", "memory_train", "controller", "iterate"),
            "iterate",
            pipeline=True,
            plays=True,
        ),
        Command(
            "evaluate",
            "frmdn_worldmodels.stages.evaluate:run",
            "score the controller in the real game, with videos",
            ("env", "controller", "evaluate"),
            "evaluate",
            StageSpec(
                ("seed", "env", "evaluate", "memory_train.use_mu"),
                upstream=("train-vae", "train-memory", "train-controller"),
            ),
            pipeline=True,
            plays=True,
            final=True,
        ),
        Command(
            "dream",
            "frmdn_worldmodels.stages.evaluate:run_dream",
            "roll out the controller in the memory's dream, as a video",
            ("env", "controller", "evaluate"),
            "dream",
            pipeline=True,
            final=True,
        ),
        Command(
            "fidelity",
            "frmdn_worldmodels.stages.fidelity:run",
            "how well the dream ranks a set of controllers as the real game does (Spearman, figure)",
            ("env", "memory", "controller", "fidelity"),
            "fidelity",
            StageSpec(
                ("seed", "env", "controller", "memory_train.use_mu", "fidelity"),
                upstream=("encode", "train-vae", "train-memory", "train-controller"),
                neutral=(*_ROLLOUT_NEUTRAL, "controller.generations"),
            ),
        ),
        Command(
            "benchmark speech",
            "frmdn_worldmodels.benchmarks.speech:run",
            "the paper's speech NLL benchmark (Table 2)",
            ("speech",),
            "benchmarks",
        ),
        Command(
            "benchmark image",
            "frmdn_worldmodels.benchmarks.image:run",
            "the paper's image NLL benchmark (Table 3)",
            ("image",),
            "benchmarks",
        ),
    )
}
PIPELINE = tuple(name for name, command in COMMANDS.items() if command.pipeline)
"""``run.py pipeline``'s stages in order (``iterate`` only when ``iterate.iterations`` > 0)."""
FINAL = tuple(name for name, command in COMMANDS.items() if command.final)
RECORDED = {name: command.record for name, command in COMMANDS.items() if command.record is not None}
"""The stages that keep a ``made_from.json``, and what their output depends on."""
