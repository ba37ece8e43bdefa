"""Running an experiment: the run directory, the stages, and the stand-alone sample command."""
