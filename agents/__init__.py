"""The controller, CMA-ES and agents acting with V + M + C (depends on rollouts and worldmodel)."""
