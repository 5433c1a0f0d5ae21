"""The one training loop of V, M and the benchmarks, CMA-ES, and the imitation start of C."""
