"""The tests of ``tests/unit/test_fidelity.py``'s subject that start Ray or a subprocess."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from frmdn_worldmodels import cli
from frmdn_worldmodels.dream.env import load_memory
from frmdn_worldmodels.runtime.config import FidelityConfig, load_config
from frmdn_worldmodels.runtime.io import read_json, save_checkpoint
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.stages import fidelity
from frmdn_worldmodels.stages.fidelity import spearman
from frmdn_worldmodels.stages.report import write_report
from tests.conftest import copy_tiny_run
from tests.unit.test_pipeline import TINY

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # the scripts import their neighbours by name
import dream_rules  # noqa: E402 (the scripts' folder on the path)


def test_fidelity_ranks_every_controller_on_the_same_dreams_and_real_seeds(
    tmp_path, tiny_run, ray_session, one_thread
):
    copy_tiny_run(tiny_run, tmp_path)
    cfg = load_config(None, [*TINY, f"runs_dir={tmp_path}", "controller.workers=2"])
    cli.check_config(cfg, "fidelity")
    assert cli.resolve(cli.COMMANDS["fidelity"].run) is fidelity.run
    cfg = replace(cfg, fidelity=FidelityConfig(controllers=7, dreams=4, real_episodes=2))  # one of each scale
    summary = fidelity.run(cfg)

    out = run_paths(cfg).fidelity
    data = read_json(out / "fidelity.json")
    rows = data["rows"]
    # the kept controller, the initial one (the linear controller's zeros: no separate zeros), the champion of
    # each generation's evaluation (the kept one is one of the 2) and 7 more
    champions = fidelity.load_champions(cfg)
    assert [champion["generation"] for champion in champions] == [1, 2]
    kinds = [
        "kept",
        "start",
        "generation",
        *["perturbed"] * len(fidelity.PERTURBATION_SCALES),
        "random",
        "random",
    ]
    assert [row["kind"] for row in rows] == kinds
    assert len(rows) == data["controllers"] == summary["controllers"] == 10
    assert len({row["name"] for row in rows}) == len(rows)
    assert len(data["real_seeds"]) == 2 and len(data["dream_starts"]) == 4
    for row in rows:
        assert row["real"]["seeds"] == data["real_seeds"]  # every controller played the same episodes
        assert len(row["dream"]["returns"]) == 4 and len(row["real"]["returns"]) == 2
        for where in ("dream", "real"):
            assert all(math.isfinite(row[where][key]) for key in ("mean", "std", "se"))
    assert -1.0 <= data["spearman"] <= 1.0 and -1.0 <= data["pearson"] <= 1.0
    assert math.isfinite(data["mean_gap"]) and data["temperature"] == cfg.controller.temperature
    dream_means = [row["dream"]["mean"] for row in rows]
    real_means = [row["real"]["mean"] for row in rows]
    assert data["spearman"] == pytest.approx(spearman(dream_means, real_means))
    assert (out / "fidelity.png").stat().st_size > 0
    assert read_json(out / "summary.json")["spearman"] == data["spearman"]

    # done: skipped, and redone with other settings; the run's report lists the figures and the picture
    assert fidelity.run(cfg)["skipped"] is True
    assert fidelity.finished(cfg) == summary
    other = FidelityConfig(controllers=7, dreams=4, real_episodes=3)
    assert fidelity.finished(replace(cfg, fidelity=other)) is None
    report = write_report(cfg, {}, {}).read_text()
    assert "(fidelity/fidelity.png)" in report and "| dream fidelity | Spearman ρ = " in report

    # the rules' ablation re-dreams the same set: with every rule, the measurement's own dream means
    overrides = [*TINY, f"runs_dir={tmp_path}", "fidelity.controllers=7", "fidelity.dreams=4"]
    overrides.append("fidelity.real_episodes=2")
    assert dream_rules.main([arg for o in overrides for arg in ("--set", o)]) == 0
    rules = read_json(out / "dream_rules.json")["variants"]
    assert rules["every rule"]["spearman"] == pytest.approx(data["spearman"])
    assert rules["every rule"]["mean_gap"] == pytest.approx(data["mean_gap"])
    assert set(rules) == {"every rule", "none of them", *(f"without: {rule}" for rule in dream_rules.RULES)}

    # with a critic (M's weights, perturbed), each pessimism weight takes the disagreement off the same dreams
    memory = load_memory(cfg)
    with torch.no_grad():
        for parameter in memory.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    critic = run_paths(cfg).critic(1)
    critic.mkdir(parents=True)
    save_checkpoint(critic / "memory.pt", **memory.to_checkpoint())
    weighed = [arg for o in [*overrides, "memory_train.critics=1"] for arg in ("--set", o)]
    variants = ["--variant", "controller.pessimism=0", "--variant", "controller.pessimism=2"]
    assert dream_rules.main([*weighed, *variants]) == 0
    rules = read_json(out / "dream_rules.json")["variants"]
    assert rules["controller.pessimism=0"]["mean_gap"] == pytest.approx(data["mean_gap"])
    heavy = rules["controller.pessimism=2"]
    assert heavy["penalty_per_step"] > 0  # and the dreams are the same: they end where they did
    assert list(heavy["penalty_per_step_by_controller"]) == [row["name"] for row in rows]
    assert min(heavy["penalty_per_step_by_controller"].values()) > 0
    assert heavy["dream_mean_length"] == rules["every rule"]["dream_mean_length"]
    assert heavy["mean_gap"] == pytest.approx(
        data["mean_gap"] - heavy["penalty_per_step"] * heavy["dream_mean_length"], rel=1e-4
    )
    assert dream_rules.main([*weighed[:-2], *variants]) == 2  # no critics: refused
