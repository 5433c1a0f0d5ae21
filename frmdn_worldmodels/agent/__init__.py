"""The V+M+C agent in the real game: its batched play and the Ray workers that run it."""
