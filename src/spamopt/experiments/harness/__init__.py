"""Parts every experiment family shares: dataclass configs as command-line options, processes and their
teardown, metrics logs, atomic checkpoints, the optimizer registry, and the optimizers × seeds runner with its
report. Families import these; nothing here imports a family."""
