"""What every layer uses: the config, run paths, stage records, atomic io, the Ray pool, progress, plots, the
machine probe (imports nothing above it)."""
