"""Built-in logger plugins: ``tensorboard`` and ``mlflow`` (switched on by ``[log] backends``).

Each needs its optional dependency (``pip install 'ncpvae[tensorboard]'`` / ``'ncpvae[mlflow]'``);
the modules import it only when a run uses the logger, so registering them costs nothing.
"""

from __future__ import annotations

from ncpvae import hookimpl


@hookimpl
def ncpvae_register_loggers() -> list[type]:
    """The built-in logger classes."""
    from ncpvae_plugins.loggers.mlflow_logger import MLflowLogger
    from ncpvae_plugins.loggers.tensorboard_logger import TensorBoardLogger

    return [TensorBoardLogger, MLflowLogger]
