"""The memory's dream: one step (dynamics), a population of controllers in it (batched), one dream as a
gymnasium env."""
