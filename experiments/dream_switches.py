"""Which dream switches move the real score: every switch on the same seeds, side by side.

    .venv/bin/python experiments/dream_switches.py [--config configs/tiny.yaml] [--seeds 0 1 2]
                                                   [--out runs/switches] [--only base,dropout]

For each seed a base run (``<out>/s<seed>-base``) runs the whole pipeline; each variant reruns it with its
switch on, sharing the base's stages that the switch does not touch (hard links of the stage folders, which
the stages' fingerprints then accept as made from the same inputs): the collected episodes, V and the latents,
and M too for the controller-side switches. Every controller is scored on the same real-game seeds as the
random policy; each switch's effect is its paired difference from the base on those seeds (mean ± standard
error). Writes ``<out>/table.md`` and ``<out>/results.json``; resumable (finished runs are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from frmdn_worldmodels.agent.play import Episode  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import load_config  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import atomic_write_text, read_json, write_json  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.evaluate import paired_difference  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.iterate import iteration_config  # noqa: E402 (sys.path)

# name -> (overrides, the base's stage folders it reuses)
DATA = ("episodes", "vae", "latents")
VARIANTS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "base": ([], ()),
    "temperature 1.5": (["controller.temperature=1.5"], (*DATA, "memory")),
    "hidden layer 8": (["controller.hidden=8"], (*DATA, "memory")),
    "dropout 0.1": (["memory.dropout=0.1"], DATA),
    "ensemble 3": (["memory.ensemble=3"], DATA),
    # two independent memories beside M; the dream pays r_t - 4 x their disagreement (dream/pessimism.py)
    "pessimism 4": (["memory_train.critics=2", "controller.pessimism=4"], (*DATA, "memory")),
    "iterate x3": (
        [
            "iterate.iterations=3",
            "iterate.episodes=8",
            "iterate.memory_epochs=5",
            "iterate.generations=20",
            "iterate.eval_episodes=16",
        ],
        (*DATA, "memory", "controller"),
    ),
}


def slug(name: str) -> str:
    return name.replace(" ", "-").replace(".", "")


def link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of ``source`` into ``target`` (same relative paths), keeping what is there."""
    for path in source.rglob("*"):
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if not destination.exists():
                os.link(path, destination)


def run_variant(config: str, out: Path, seed: int, name: str) -> dict:
    overrides, shared = VARIANTS[name]
    run_name = f"s{seed}-{slug(name)}"
    settings = [f"runs_dir={out}", f"name={run_name}", f"seed={seed}", *overrides]
    for folder in shared:
        link_tree(out / f"s{seed}-base" / folder, out / run_name / folder)
    args = [sys.executable, "run.py", "pipeline", "--config", config, *(f"--set={s}" for s in settings)]
    with open(out / f"{run_name}.log", "w") as log:
        result = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{name}, seed {seed}: the pipeline failed, see {out / f'{run_name}.log'}")
    return collect_row(config, out, seed, name, json.loads(result.stdout)["total_seconds"])


def collect_row(config: str, out: Path, seed: int, name: str, seconds: float | None) -> dict:
    """The figures of one finished run: its final controller's real score (and the random policy's on the same
    seeds), its dream score, and the dream-vs-real gap at the generation the controller was kept."""
    overrides, _ = VARIANTS[name]
    cfg = load_config(
        ROOT / config, [f"runs_dir={out}", f"name=s{seed}-{slug(name)}", f"seed={seed}", *overrides]
    )
    final = iteration_config(cfg, cfg.iterate.iterations)
    evaluation = read_json(final.run_dir / "evaluate" / "summary.json")
    controller = read_json(final.run_dir / "controller" / "summary.json")
    rows = [
        json.loads(line) for line in (final.run_dir / "controller" / "metrics.jsonl").read_text().splitlines()
    ]
    kept = next(
        (r for r in rows if r["generation"] == controller["best_generation"] and "real_mean" in r), {}
    )
    return {
        "variant": name,
        "seed": seed,
        "real_mean": evaluation["mean"],
        "real_std": evaluation["std"],
        "returns": evaluation["returns"],
        "seeds": evaluation["seeds"],
        "random_mean": evaluation["random_policy"]["mean"],
        "episodes": evaluation["episodes"],
        "max_x": (evaluation.get("max_x") or {}).get("mean"),
        "dream_best": controller["best_score"],
        "gap_dream": kept.get("eval_mean"),
        "gap_real": kept.get("real_mean"),
        "seconds": seconds,
    }


def effect(row: dict, rows: list[dict]) -> dict | None:
    """The switch's paired difference from the base run of its seed (None for the base, or without it)."""
    base = next((r for r in rows if r["variant"] == "base" and r["seed"] == row["seed"]), None)
    if row["variant"] == "base" or base is None:
        return None

    def episodes(r: dict) -> list[Episode]:
        return [Episode(seed, ret, 0) for seed, ret in zip(r["seeds"], r["returns"], strict=True)]

    return paired_difference(episodes(row), episodes(base))


def table(rows: list[dict]) -> str:
    lines = [
        "| switch | seed | real score (mean ± std) | switch - base, paired (± SE) | random policy | "
        "dream score of the kept controller | kept controller at its evaluation: dream / real | "
        "pipeline seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gap = f"{row['gap_dream']:.1f} / {row['gap_real']:.1f}" if row["gap_real"] is not None else "—"
        paired = effect(row, rows)
        shown = "—" if paired is None else f"{paired['mean']:+.1f} ± {paired['se']:.1f}"
        real = f"{row['real_mean']:.1f} ± {row['real_std']:.1f}"
        lines.append(
            f"| {row['variant']} | {row['seed']} | {real} | {shown} | "
            f"{row['random_mean']:.1f} | {row['dream_best']:.1f} | {gap} | "
            + (f"{row['seconds']:.0f} |" if row["seconds"] is not None else "— |")
        )
    names = list(dict.fromkeys(row["variant"] for row in rows))
    lines += ["", "| switch | mean real score over seeds | seeds above the random policy |", "|---|---|---|"]
    for name in names:
        mine = [row for row in rows if row["variant"] == name]
        mean = sum(row["real_mean"] for row in mine) / len(mine)
        above = sum(row["real_mean"] > row["random_mean"] for row in mine)
        lines.append(f"| {name} | {mean:.1f} | {above} of {len(mine)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/switches")
    parser.add_argument("--only", help="comma-separated switch names (default: all)")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the finished runs")
    args = parser.parse_args()
    names = list(VARIANTS) if not args.only else ["base", *(n for n in args.only.split(",") if n != "base")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown switch {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    seconds = {
        (r["variant"], r["seed"]): r["seconds"]
        for r in (read_json(out / "results.json") if (out / "results.json").exists() else [])
    }
    for seed in args.seeds:
        for name in names:
            if args.table:
                if (out / f"s{seed}-{slug(name)}" / "report.md").exists():
                    rows.append(collect_row(args.config, out, seed, name, seconds.get((name, seed))))
                continue
            rows.append(run_variant(args.config, out, seed, name))
            print(
                f"{name}, seed {seed}: real {rows[-1]['real_mean']:.1f} "
                f"(random {rows[-1]['random_mean']:.1f})",
                file=sys.stderr,
                flush=True,
            )
            write_json(out / "results.json", rows)
            atomic_write_text(out / "table.md", table(rows))
    if args.table:
        atomic_write_text(out / "table.md", table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
