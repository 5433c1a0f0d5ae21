"""The one seed tree (``runtime/seeds.py``): named purposes that draw the streams every published result was
drawn from, and no other module seeds numpy by hand."""

import ast
from pathlib import Path

import numpy as np

from frmdn_worldmodels.runtime.seeds import (
    EPISODE_PURPOSES,
    PURPOSES,
    episode_rng,
    seed_ints,
    seed_sequence,
    seeded_rng,
)

PACKAGE = Path(__file__).resolve().parents[2] / "frmdn_worldmodels"


def test_every_purpose_has_its_own_number():
    assert len(set(PURPOSES.values())) == len(PURPOSES)
    assert len(set(EPISODE_PURPOSES.values())) == len(EPISODE_PURPOSES)


def test_the_streams_are_those_the_runs_were_drawn_from():
    """The tree names the streams; it must not move them (the tiny pipeline's figures stay identical)."""
    old = np.random.SeedSequence([3, 2, 0]).generate_state(4)  # the evaluate stage's seeds, run seed 3
    assert seed_ints(3, "test", 0, count=4) == [int(s) for s in old]
    assert seed_sequence(3, None, 7).spawn(2)[1].entropy == np.random.SeedSequence([3, 7]).spawn(2)[1].entropy
    assert seeded_rng(5, None, 2, 1).random() == np.random.default_rng([5, 2, 1]).random()
    assert episode_rng("action-noise", 11).random() == np.random.default_rng([7, 11]).random()
    assert seed_ints(0, "iterate-collect", 2, count=1) != seed_ints(0, "iterate-eval", 2, count=1)


def _seeds_by_hand(path: Path) -> bool:
    """Whether a file calls ``SeedSequence([...])`` or ``default_rng([...])`` with a list of its own."""
    return any(
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("SeedSequence", "default_rng")
        and node.args
        and isinstance(node.args[0], ast.List)
        for node in ast.walk(ast.parse(path.read_text()))
    )


def test_no_module_seeds_numpy_by_hand():
    assert _seeds_by_hand(PACKAGE / "runtime" / "seeds.py")  # the check sees the tree's own calls
    offenders = [
        p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name != "seeds.py" and _seeds_by_hand(p)
    ]
    assert offenders == []
