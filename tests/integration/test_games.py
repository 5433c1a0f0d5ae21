"""The tests of ``tests/unit/test_games.py``'s subject that start Ray or a subprocess."""

from tests.unit.test_games import TOY
from tests.unit.test_pipeline import TINY, check_outputs, run_pipeline


def test_a_game_named_in_the_config_runs_collect_to_evaluate(tmp_path):
    """The toy game through the command line (its Ray workers import it by its name): collect, V, M, C in
    the dream, evaluate and the dream video."""
    summary, _ = run_pipeline(tmp_path, [*TINY, f"env.name={TOY}", "controller.dream_start=first"])
    check_outputs(tmp_path / "tiny", episodes=3)
    assert summary["report"]
