"""One module per command of the pipeline: its config checks and its run(cfg) -> summary."""
