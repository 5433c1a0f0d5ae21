"""``run.py fidelity``: Spearman's rank correlation (ties included) and the measurement end to end on the
session's tiny run (the same dreams and the same real seeds for every controller, the json, the figure, the
report)."""

import numpy as np
import pytest

from frmdn_worldmodels.runtime.config import ConfigError, load_config
from frmdn_worldmodels.stages.fidelity import average_ranks, pearson, spearman


def test_average_ranks_share_the_mean_rank_of_ties():
    assert average_ranks([3.0, 1.0, 3.0, 3.0]).tolist() == [3.0, 1.0, 3.0, 3.0]  # the 3s span ranks 2..4
    assert average_ranks([10.0, -1.0, 2.5]).tolist() == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="non-finite"):
        average_ranks([1.0, float("nan")])


def test_spearman_by_hand_with_ties_and_against_scipy():
    x, y = [1.0, 2.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 4.0, 6.0]
    # ranks [1, 2.5, 2.5, 4, 5] and [2, 1, 3.5, 3.5, 5], both of mean 3: r = 7.25 / sqrt(9.5 * 9.5) = 29 / 38
    assert spearman(x, y) == pytest.approx(29 / 38)
    assert spearman(x, x) == pytest.approx(1.0) and spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # a constant: undefined
    assert pearson([1.0], [2.0]) is None
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 5, 12).astype(float), rng.integers(0, 5, 12).astype(float)  # many ties
        if len(set(a)) > 1 and len(set(b)) > 1:
            assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
            assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)


def test_fidelity_config_is_refused_where_it_cannot_give_a_standard_error():
    load_config(None, [])  # the defaults
    with pytest.raises(ConfigError, match="fidelity.real_episodes must be at least 2"):
        load_config(None, ["fidelity.real_episodes=1"])


def test_fidelity_refuses_a_run_without_a_controller(tmp_path, run_main):
    result = run_main("fidelity", "--set", f"runs_dir={tmp_path}")
    assert result.returncode == 2
    assert "best.pt" in result.stderr and "train-controller" in result.stderr
