"""Training and scoring a DLRM over one or many processes: the loop, its schedule and precision,
the process group, sharding and planning, the run's data, checkpoints and their record."""
