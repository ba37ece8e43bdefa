"""Running an experiment (docs/architecture.md §6): ``directory`` (every file of a run directory),
``checkpoint`` (the checkpoint format), ``seeds`` (named seed offsets), ``build`` (``Run``,
``build_run``, ``open_run``), the stages ``train``, ``fit`` and ``sample`` (with the one
draw -> decode -> plot path), ``stages`` (the stage list and its loop) and ``sample_command``
(``ncpvae sample``). Nothing here imports :mod:`ncpvae.evaluation`, which builds on it."""
