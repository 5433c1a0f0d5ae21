"""The pipeline's report: one Markdown page with every stage's figures and the pictures a person wants to
see."""

from __future__ import annotations

import math
import os
from pathlib import Path

from frmdn_worldmodels.runtime.config import Config
from frmdn_worldmodels.runtime.io import atomic_write_text
from frmdn_worldmodels.runtime.machine import summary_line
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.records import recorded_seconds
from frmdn_worldmodels.runtime.registry import FINAL, RECORDED

MEDIA_SUFFIXES = (".png", ".gif", ".mp4")
SKIPPED_KEYS = {"settings", "memory_config"}
"""Copies of the config inside summaries: the report links the resolved config once instead."""


def work_seconds(config: Config, stage: str, summary: dict | None, fallback: float) -> float:
    """Wall seconds of a stage's work summed over every invocation that did part of it (the stage's record, or
    for ``iterate`` its iterations' rows), so a resumed pipeline still says where the time went; ``fallback``
    (this invocation's time) where neither is known."""
    if stage == "iterate":
        rows = (summary or {}).get("rows") or []
        return float(sum(row.get("seconds", 0.0) for row in rows)) if rows else fallback
    if stage in RECORDED:
        recorded = recorded_seconds(run_paths(config).of(stage))
        if recorded is not None:
            return recorded
    return fallback


def fidelity_summary(config: Config) -> dict | None:
    """The run's dream-fidelity measurement (``run.py fidelity``, not a pipeline stage) if it was made from
    the run's memory and controller as they are now; None without one."""
    if not (run_paths(config).fidelity / "summary.json").exists():
        return None
    from frmdn_worldmodels.stages.fidelity import finished  # here: it imports torch and the agents

    return finished(config)


def _scalars(summary: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Flatten the numbers, strings and booleans of a (nested) summary into dotted keys."""
    rows: list[tuple[str, object]] = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if key in SKIPPED_KEYS:
            continue
        if isinstance(value, dict):
            rows.extend(_scalars(value, name + "."))
        elif isinstance(value, bool | int | str) or value is None:
            rows.append((name, value))
        elif isinstance(value, float):
            rows.append((name, value if math.isfinite(value) else str(value)))
    return rows


def _mean_std(stats: dict, digits: int) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats.get('std', 0.0):.{digits}f}"


def _evaluation_rows(evaluation: dict) -> list[tuple[str, str]]:
    """The real-game score beside the random policy's and the teacher's on the same seeds."""
    rows = []
    random = evaluation.get("random_policy") or {}
    if "mean" in evaluation:
        line = f"{_mean_std(evaluation, 1)} over {evaluation.get('episodes')} episodes"
        if "mean" in random:
            line += f" (random policy on the same seeds: {_mean_std(random, 1)})"
        rows.append(("real-game score", line))
    teacher = evaluation.get("teacher") or {}
    if "mean" in teacher:
        paired = teacher["agent_minus_teacher"]
        line = f"{_mean_std(teacher, 1)}; agent - teacher, paired: {paired['mean']:+.1f} ± {paired['se']:.1f}"
        if "max_x" in paired:
            line += f", furthest x {paired['max_x']['mean']:+.0f} ± {paired['max_x']['se']:.0f}"
        rows.append((f"teacher ({teacher['policy']}), same seeds", line))
    if "max_x" in evaluation:
        line = _mean_std(evaluation["max_x"], 0)
        if "mean" in random.get("max_x", {}):
            line += f" (random policy: {_mean_std(random['max_x'], 0)})"
        rows.append(("furthest x position", line))
    return rows


def _headline(summaries: dict[str, dict]) -> list[str]:
    """The few numbers a reader looks for first, where the stages reported them."""
    rows = _evaluation_rows(summaries.get("evaluate") or {})
    controller = summaries.get("train-controller") or {}
    if "best_score" in controller:
        line = f"{controller['best_score']:.2f} after {controller.get('generations')} generations"
        if controller.get("imitate_weight"):
            line += f" (the dream return less {controller['imitate_weight']:g} x the imitation loss)"
        rows.append((f"best fitness in the {controller.get('train_in', '?')}", line))
    start = controller.get("start")
    if start:
        line = (
            f"imitates {start['episodes']} collected episodes (mean return {start['mean_return']:.1f}; "
            f"action loss {start['loss']:.4f} against {start['constant_loss']:.4f} for a constant action): "
            f"{start['eval_mean']:.1f} in the dream"
        )
        if "real_mean" in start:
            line += f", {start['real_mean']:.1f} ± {start['real_std']:.1f} in the real game"
        rows.append(("CMA-ES start (controller.init: imitate)", line))
    gap = controller.get("gap")
    if gap:
        last = gap["last"]
        rows.append(
            (
                "dream vs real game",
                f"the kept controller (generation {gap['generation']}): {gap['dream_mean']:.1f} in the "
                f"dream, {gap['real_mean']:.1f} ± {gap['real_std']:.1f} in the real game; the last "
                f"evaluation (generation {last['generation']}): {last['eval_mean']:.1f} / "
                f"{last['real_mean']:.1f}",
            )
        )
    fidelity = summaries.get("fidelity") or {}
    if "spearman" in fidelity:
        rho = "undefined" if fidelity["spearman"] is None else f"{fidelity['spearman']:.2f}"
        rows.append(
            (
                "dream fidelity",
                f"Spearman ρ = {rho} between the dream's and the real game's mean returns of "
                f"{fidelity['controllers']} controllers (dream - real {fidelity['mean_gap']:+.1f} on "
                "average)",
            )
        )
    iterate = summaries.get("iterate") or {}
    if iterate.get("rows"):
        first, last = iterate["rows"][0], iterate["rows"][-1]
        rows.append(
            (
                "iterative training",
                f"real score {first['real_mean']:.1f} -> {last['real_mean']:.1f} over "
                f"{iterate['iterations']} iterations ({last['episodes_total']} episodes; random policy "
                f"{last['random_mean']:.1f})",
            )
        )
    memory = summaries.get("train-memory") or {}
    if memory.get("test_nll_per_dim") is not None:
        rows.append(("memory test NLL", f"{memory['test_nll_per_dim']:.4f} nats per latent dimension"))
    vae = summaries.get("train-vae") or {}
    if "val_loss" in vae:
        rows.append(
            ("VAE validation loss", f"{vae['val_loss']:.1f} (reconstruction {vae.get('val_recon', 0):.1f})")
        )
    if not rows:
        return []
    return ["| headline | |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], ""]


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _title(config: Config, summaries: dict[str, dict]) -> str:
    """The report's heading: the run, its game, memory and where its controller was trained."""
    title = (
        f"# Run `{config.name}`: {config.env.name}, memory {config.memory.kind} "
        f"(K={config.memory.components}, d'={config.memory.rank}), "
        f"controller trained in the {config.controller.train_in}"
    )
    controller = summaries.get("train-controller") or {}
    if controller.get("dream_horizon"):
        starts = "any frame" if controller.get("dream_start") == "any" else "the first frames"
        title += (
            f" (dreams of up to {controller['dream_horizon']} steps from {starts} of the collected episodes)"
        )
    return title


def _stage_section(stage: str, summary: dict | None, folder: Path, root: Path) -> list[str]:
    """A stage's section: its summary's figures, ``iterate``'s table of iterations, and links to the
    pictures and videos in ``folder`` (relative to the run's ``root``)."""
    lines = [f"## {stage}", ""]
    rows = _scalars(summary or {})
    if rows:
        lines += ["| figure | value |", "|---|---|", *[f"| {k} | {_format(v)} |" for k, v in rows], ""]
    if stage == "iterate" and summary.get("rows"):
        columns = (
            "iteration",
            "episodes_total",
            "real_mean",
            "real_std",
            "dream_best",
            "random_mean",
            "seconds",
        )
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_format(row.get(c)) for c in columns) + " |" for row in summary["rows"]]
        lines.append("")
    media = sorted(p for p in folder.glob("*") if p.suffix in MEDIA_SUFFIXES) if folder.is_dir() else []
    for path in media:
        relative = os.path.relpath(path, root).replace(os.sep, "/")
        lines += [
            f"![{path.stem}]({relative})" if path.suffix != ".mp4" else f"[{path.name}]({relative})",
            "",
        ]
    return lines


def write_report(
    config: Config,
    summaries: dict[str, dict],
    seconds: dict[str, float],
    folders: dict[str, Path] | None = None,
    work: dict[str, float] | None = None,
    machine: dict | None = None,
) -> Path:
    """Write ``<run>/report.md`` and return its path. ``seconds``: this invocation's time per stage; ``work``:
    each stage's own time over every invocation (``work_seconds``; default ``seconds``). ``folders``: where a
    stage's pictures are, when not in the run's own folder of that stage (the last iteration's
    evaluation). ``machine``: this invocation's (``runtime.machine.describe``), shown with the run's
    earlier ones."""
    work = work or seconds
    if "fidelity" not in summaries and (fidelity := fidelity_summary(config)) is not None:
        summaries = {**summaries, "fidelity": fidelity}  # listed after the stages, never timed with them
    training = sum(secs for stage, secs in work.items() if stage not in FINAL)

    def share(stage: str) -> str:
        return "" if stage in FINAL or not training else f"{work[stage] / training:.0%}"

    root = run_paths(config).root
    lines = [
        _title(config, summaries),
        "",
        f"Time of this invocation: {sum(seconds.values()):.0f} s. Training (every stage's work but "
        f"{' and '.join(FINAL)}, over all invocations): {training:.0f} s = "
        f"{training / 60:.1f} min. Resolved config: [config.yaml](config.yaml).",
        "",
        *([line, ""] if (line := summary_line(root, machine)) else []),
        *_headline(summaries),
        "| stage | seconds of the stage's work | share of the training time | seconds in this invocation |",
        "|---|---|---|---|",
        *[
            f"| {stage} | {work[stage]:.1f} | {share(stage)} | {secs:.1f} |"
            for stage, secs in seconds.items()
        ],
        "",
    ]
    for stage, summary in summaries.items():
        folder = (folders or {}).get(stage, run_paths(config).of(stage))
        lines += _stage_section(stage, summary, folder, root)
    report = root / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
