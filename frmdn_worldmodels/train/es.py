"""CMA-ES (the ``cma`` package, ask/tell) with a seeded RNG and a checkpoint made of plain data.

``cma.CMAEvolutionStrategy`` can be pickled, but we never unpickle files. Instead ``CMAES.state_dict()``
copies every attribute of the strategy and of its parts (sampler with the covariance C, its eigen basis B and
D; the step-size adaptation with its evolution path p_sigma; the path p_c; mean; sigma; counters; fitness
history; best solution) whose value is plain data (numbers, strings, numeric arrays, lists of them), and
``CMAES.from_state_dict`` builds a fresh strategy from the same x0, sigma0 and options and writes them back.
The normal draws come from our own ``numpy.random.Generator`` (cma's ``randn`` option), whose state is plain
data too; so a run resumed from a checkpoint continues exactly as the uninterrupted run would have (a test
checks this bit for bit).

Mirrored sampling (cma's default for populations below 6) is switched off: it keeps state in dicts keyed by
solution hashes, which are not plain data.

``diagonal=True`` is sep-CMA-ES (Ros & Hansen 2008; cma's ``CMA_diagonal``): the covariance is
diag(d)^2 instead of a full n x n matrix, so a generation costs O(n) instead of
O(n^2) and the checkpoint holds vectors only. A controller with a hidden layer has thousands of parameters
(Mario's with 32 units: 9,479): the full matrix alone is then 0.7 GB, each ``tell`` ~4.5 s and each
checkpoint ~2.9 GB.
"""

from __future__ import annotations

import warnings

import cma
import numpy as np
import torch
from cma.utilities.utils import ElapsedWCTime

# the strategy's parts whose plain attributes make up its state
_PARTS = ("sm", "adapt_sigma", "sigma_vec", "best", "fit", "_stoptolxstagnation")


def _is_plain(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    if isinstance(value, (np.floating, np.integer, np.bool_, int, float, bool, str, type(None))):
        return True
    if type(value) in (list, tuple):
        return all(_is_plain(item) for item in value)
    if type(value) is dict:
        return all(isinstance(key, str) and _is_plain(item) for key, item in value.items())
    return False


def _encode(value):
    """numpy -> torch (keeping the memory layout: BLAS results depend on it) and numpy scalars -> Python."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True, order="K"))
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if type(value) in (list, tuple):
        return type(value)(_encode(item) for item in value)
    if type(value) is dict:
        return {key: _encode(item) for key, item in value.items()}
    return value


def _decode(value):
    if isinstance(value, torch.Tensor):
        return np.array(value.numpy(), copy=True, order="K")
    if type(value) in (list, tuple):
        return type(value)(_decode(item) for item in value)
    if type(value) is dict:
        return {key: _decode(item) for key, item in value.items()}
    return value


def _plain_attributes(obj) -> dict:
    return {name: _encode(value) for name, value in vars(obj).items() if _is_plain(value)}


class CMAES:
    """CMA-ES that *maximises* fitness; ``ask`` -> candidates ``[P, n]``,
    ``tell(candidates, fitness [P])``."""

    def __init__(self, x0: np.ndarray, sigma: float, population: int, seed: int, diagonal: bool = False):
        if population < 3 or sigma <= 0:
            raise ValueError(f"CMA-ES needs population >= 3 and sigma > 0, got {population} and {sigma}")
        self.x0, self.sigma0, self.population, self.seed, self.diagonal = (
            np.asarray(x0, dtype=np.float64),
            float(sigma),
            population,
            seed,
            diagonal,
        )
        self.rng = np.random.default_rng(seed)
        options = {
            "popsize": population,
            "randn": self._randn,
            "CMA_mirrors": 0,
            "CMA_diagonal": diagonal,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "seed will never be used": our randn is the seeded one
            self.es = cma.CMAEvolutionStrategy(self.x0, self.sigma0, options)

    def _randn(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)

    @property
    def generation(self) -> int:
        """Completed generations (ask/tell pairs)."""
        return int(self.es.countiter)

    @property
    def mean(self) -> np.ndarray:
        return np.array(self.es.mean, dtype=np.float64)

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    def ask(self) -> np.ndarray:
        return np.stack(self.es.ask())

    def tell(self, candidates: np.ndarray, fitness: np.ndarray) -> None:
        fitness = np.asarray(fitness, dtype=np.float64)
        if fitness.shape != (len(candidates),) or not np.all(np.isfinite(fitness)):
            raise ValueError(f"tell needs one finite fitness per candidate, got {fitness!r}")
        self.es.tell(list(candidates), list(-fitness))  # cma minimises

    def stop_reasons(self) -> dict:
        """cma's termination criteria that fire (informative only: the loop runs its generations)."""
        return {
            key: float(value) if isinstance(value, (int, float)) else str(value)
            for key, value in self.es.stop().items()
        }

    def state_dict(self) -> dict:
        """Plain data (tensors, numbers, strings, lists, dicts): loadable with
        ``torch.load(weights_only=True)``."""
        return {
            "x0": torch.from_numpy(self.x0.copy()),
            "sigma0": self.sigma0,
            "population": self.population,
            "seed": self.seed,
            "diagonal": self.diagonal,
            "rng": self.rng.bit_generator.state,
            "cma_version": cma.__version__,
            "strategy": _plain_attributes(self.es),
            "parts": {
                part: _plain_attributes(getattr(self.es, part)) for part in _PARTS if hasattr(self.es, part)
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> CMAES:
        """The strategy of ``state_dict()``, continuing where it stopped."""
        if state.get("cma_version") != cma.__version__:
            warnings.warn(
                f"ES state written by cma {state.get('cma_version')}, resuming with cma {cma.__version__}"
            )
        es = cls(
            state["x0"].numpy(),
            state["sigma0"],
            state["population"],
            state["seed"],
            state.get("diagonal", False),  # states written before the option were full
        )
        for name, value in state["strategy"].items():
            setattr(es.es, name, _decode(value))
        for part, attributes in state["parts"].items():
            for name, value in attributes.items():
                setattr(getattr(es.es, part), name, _decode(value))
        # cma starts its timer on the first ask; a resumed strategy has passed that point
        es.es.timer = ElapsedWCTime()
        es.rng.bit_generator.state = state["rng"]
        return es
