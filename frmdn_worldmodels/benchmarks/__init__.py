"""The paper's speech (Table 2) and image (Table 3) likelihood benchmarks, on the same memory model."""
