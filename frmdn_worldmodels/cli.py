"""World-model agents with an FRMDN memory: one command per stage of the V-M-C pipeline.

    python run.py <command> [--config configs/<name>.yaml] [--set key=value ...] [--device cpu]

With no --config every command uses the embedded tiny config (configs/tiny.yaml).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
import time
import typing
from collections.abc import Callable

from frmdn_worldmodels.runtime.config import Config, ConfigError, TrainIn, describe_fields, load_config
from frmdn_worldmodels.runtime.io import DataError
from frmdn_worldmodels.runtime.pool import PoolKeeper
from frmdn_worldmodels.runtime.registry import COMMANDS, FINAL, PIPELINE
from frmdn_worldmodels.runtime.rules import check_rules

# section -> (check "module:function", the config attribute it takes; None = the whole config). Every command
# runs the checks of every section it will use before any work, so a bad value costs seconds, not a collected
# data set.
SECTION_CHECKS: dict[str, tuple[str, str | None]] = {
    "run": ("frmdn_worldmodels.runtime.config:check_run_config", None),
    "env": ("frmdn_worldmodels.games.envs:check_env_config", "env"),
    "collect": ("frmdn_worldmodels.stages.collect:check_collect_config", None),
    "memory": ("frmdn_worldmodels.models.memory:check_memory_config", "memory"),
    "controller": ("frmdn_worldmodels.agent.play:check_controller_config", None),
    "evaluate": ("frmdn_worldmodels.stages.evaluate:check_evaluate_config", None),
    "image": ("frmdn_worldmodels.benchmarks.image:check_image_config", None),
    "speech": ("frmdn_worldmodels.benchmarks.speech:check_speech_config", None),
}


def sections_of(command: str, sweep: bool = False) -> list[str]:
    """The config sections ``command`` reads (``run``: the top-level fields), each once."""
    commands = PIPELINE if command == "pipeline" else (command,)
    sections = ["run", *(section for name in commands for section in COMMANDS[name].sections)]
    if sweep:
        sections.append("sweep")
    return list(dict.fromkeys(sections))


def check_config(config: Config, command: str, sweep: bool = False) -> None:
    """Refuse a bad value in any section ``command`` will use (``ConfigError`` naming the field), before any
    work."""
    sections = sections_of(command, sweep)
    for section in sections:
        if section not in SECTION_CHECKS:  # its field types say all it accepts, and the loader checked them
            continue
        target, attribute = SECTION_CHECKS[section]
        resolve(target)(config if attribute is None else getattr(config, attribute))
    check_rules(config, *sections)


def resolve(target: str) -> Callable[[Config], dict]:
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def use_threads(count: int) -> None:
    """Apply the config's ``threads`` to torch (0 leaves torch's default; torch is imported only when
    needed)."""
    if count:
        import torch

        torch.set_num_threads(count)


def stage_config(config: Config, stage: str) -> Config:
    """The config ``stage`` runs with: with ``iterate.iterations`` > 0 the stages that score or show the final
    controller (``registry.FINAL``) read the last iteration's run, as the pipeline does."""
    from frmdn_worldmodels.runtime.paths import run_paths
    from frmdn_worldmodels.runtime.progress import note
    from frmdn_worldmodels.stages.iterate import iteration_config

    if stage not in FINAL or not config.iterate.iterations:
        return config
    final = iteration_config(config, config.iterate.iterations)
    controller = run_paths(final).controller / "best.pt"
    if not controller.exists():
        raise DataError(
            f"{controller}: iterate.iterations = {config.iterate.iterations}, and the last iteration has no "
            "controller yet; run `python run.py pipeline` (or `run.py iterate` after train-controller) "
            f"first, or `--set iterate.iterations=0` to {stage} the first controller"
        )
    iterations = config.iterate.iterations
    note(f"{stage}: the last iteration's controller (iterate.iterations = {iterations}): {controller}")
    return final


def run_stage(name: str, config: Config, keeper: PoolKeeper) -> dict:
    """Run the registered command ``name``; a stage that plays on Ray is handed the command's ``keeper``."""
    command = COMMANDS[name]
    if command.plays:
        return resolve(command.run)(config, keeper=keeper)
    return resolve(command.run)(config)


def run_pipeline(config: Config, keeper: PoolKeeper, machine: dict | None = None) -> dict:
    """Every stage in order, then ``<run>/report.md`` with each stage's figures and pictures and ``machine``
    (``frmdn_worldmodels.runtime.machine.describe``), the machine this invocation runs on; the stages share
    ``keeper``'s rollout actors."""
    from frmdn_worldmodels.runtime.paths import run_paths
    from frmdn_worldmodels.stages.report import work_seconds, write_report

    # with iterative training, the iterations come after the first controller, and the final evaluation and
    # dream video are those of the last iteration's controller
    stages = [stage for stage in PIPELINE if stage != "iterate" or config.iterate.iterations]
    summaries, seconds, work, configs = {}, {}, {}, {}
    for stage in stages:
        print(f"[pipeline] {stage}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        configs[stage] = stage_config(config, stage)
        summaries[stage] = run_stage(stage, configs[stage], keeper)
        seconds[stage] = round(time.perf_counter() - start, 1)
        work[stage] = round(work_seconds(configs[stage], stage, summaries[stage], seconds[stage]), 1)
    folders = {stage: run_paths(configs[stage]).of(stage) for stage in FINAL}
    report = write_report(config, summaries, seconds, folders, work, machine)
    return {
        "report": str(report),
        "machine": machine,
        "seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 1),
        "work_seconds": work,
    }


def build_parser(fields: bool = True) -> argparse.ArgumentParser:
    """The command line; ``fields``: each command's help lists the config fields it reads (read from the
    config's source, so only when help is asked for)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (default: the embedded configs/tiny.yaml)")
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set memory.components=3 (repeatable)",
    )
    common.add_argument("--device", help="torch device (cpu, cuda, mps); overrides the config's device")
    common.add_argument(
        "--refuse-stale",
        action="store_true",
        help="refuse (exit 2) instead of redoing a stage whose folder was made from other settings or inputs",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    parsers = {
        name: commands.add_parser(name, parents=[common], help=command.help)
        for name, command in COMMANDS.items()
        if not name.startswith("benchmark ")
    }
    parsers["train-memory"].add_argument(
        "--sweep", choices=["table1"], help="train the paper's Table 1 grid instead of one model"
    )
    parsers["train-controller"].add_argument(
        "--in", dest="train_in", choices=typing.get_args(TrainIn), help="where candidates are scored"
    )
    benchmark = commands.add_parser(
        "benchmark", parents=[common], help="the paper's speech or image NLL benchmark"
    )
    benchmark.add_argument("kind", choices=["speech", "image"])
    benchmark.add_argument(
        "--data", help="folder holding the data set (speech: .wav files; image: MNIST/CIFAR-10)"
    )
    commands.add_parser("pipeline", parents=[common], help="every stage in order, skipping what is done")
    for name, command in commands.choices.items() if fields else ():
        names = ["benchmark speech", "benchmark image"] if name == "benchmark" else [name]
        sections = dict.fromkeys(section for n in names for section in sections_of(n))
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        command.epilog = "config fields it reads (--set FIELD=VALUE; default shown):\n" + "\n".join(
            describe_fields(list(sections))
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    args = build_parser(fields=bool({"-h", "--help"} & set(arguments))).parse_args(argv)
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.refuse_stale:
        overrides.append("stale=refuse")
    if getattr(args, "train_in", None):
        overrides.append(f"controller.train_in={args.train_in}")
    command = args.command
    if command == "benchmark":
        command = f"benchmark {args.kind}"
        if args.data:
            overrides.append(f"{args.kind}.data={json.dumps(args.data)}")
    machine, code = None, 1  # an exception other than those below leaves exit code 1
    try:
        config = load_config(args.config, overrides)
        check_config(config, command, sweep=command == "train-memory" and bool(args.sweep))
        use_threads(config.threads)
        from frmdn_worldmodels.runtime.machine import describe

        machine = describe()  # after the checks: a bad setting is refused without it
        # stages in a row that play with the same models (the controller's real evaluations, the iterations'
        # scores and collections, the final evaluation) reuse the rollout actors instead of starting new ones
        with PoolKeeper() as keeper:
            if command == "train-memory" and args.sweep:
                from frmdn_worldmodels.benchmarks.table1 import run_table1
                from frmdn_worldmodels.runtime.cluster import ray_map

                summary = run_table1(config, map_fn=ray_map(config.ray))
            elif command == "pipeline":
                summary = run_pipeline(config, keeper, machine)
            else:
                summary = run_stage(command, stage_config(config, command), keeper)
        code = 0
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        code = 130
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(
            f"error: the disk is full ({error.filename or 'writing'}; nothing half-written is kept): free "
            "space and rerun the same command to resume",
            file=sys.stderr,
        )
        code = 1
    finally:
        if machine is not None:
            from frmdn_worldmodels.runtime.machine import record
            from frmdn_worldmodels.runtime.paths import run_paths

            record(run_paths(config).root, machine, command, code)
    if code == 0 and summary:
        print(json.dumps(summary, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
