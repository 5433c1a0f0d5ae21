"""The experiment scripts: the switch comparison's sharing of stages and its table (``dream_switches.py``),
the imitation score's refusals (``score_imitation.py``)."""

from __future__ import annotations

import subprocess
import sys

from tests.test_pipeline import REPO

sys.path.insert(0, str(REPO / "experiments"))

import dream_switches  # noqa: E402 (the script's folder on the path)


def test_shared_stage_folders_are_hard_links_and_nothing_is_overwritten(tmp_path):
    source = tmp_path / "base" / "vae"
    (source / "sub").mkdir(parents=True)
    (source / "vae.pt").write_bytes(b"weights")
    (source / "sub" / "x.txt").write_text("x")
    target = tmp_path / "variant" / "vae"
    target.mkdir(parents=True)
    (target / "vae.pt").write_bytes(b"mine")
    dream_switches.link_tree(source, target)
    assert (target / "vae.pt").read_bytes() == b"mine"
    assert (target / "sub" / "x.txt").stat().st_ino == (source / "sub" / "x.txt").stat().st_ino


def test_the_table_counts_the_seeds_above_the_random_policy():
    rows = [
        {
            "variant": name,
            "seed": seed,
            "real_mean": real,
            "real_std": 1.0,
            "random_mean": 0.0,
            "dream_best": 5.0,
            "gap_dream": 5.0,
            "gap_real": real,
            "seconds": 60.0,
        }
        for name, seed, real in (("base", 0, 1.0), ("base", 1, -1.0), ("dropout 0.1", 0, 2.0))
    ]
    text = dream_switches.table(rows)
    assert "| base | 0.0 | 1 of 2 |" in text and "| dropout 0.1 | 2.0 | 1 of 1 |" in text
    assert "| base | 1 | -1.0 ± 1.0 | 0.0 | 5.0 | 5.0 / -1.0 | 60 |" in text


def test_an_unknown_switch_is_refused():
    result = subprocess.run(
        [sys.executable, "experiments/dream_switches.py", "--only", "magic"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "unknown switch 'magic'" in result.stderr


def test_the_imitation_score_refuses_a_run_without_an_imitation_or_a_memory(tmp_path, run_main):
    import score_imitation

    def score(*overrides):
        return run_main(f"--set=runs_dir={tmp_path}", *overrides, main=score_imitation.main)

    result = score()
    assert result.returncode == 2 and "controller.init is 'zeros'" in result.stderr
    result = score("--set=controller.init=imitate")
    assert result.returncode == 2 and "no trained memory" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any work
