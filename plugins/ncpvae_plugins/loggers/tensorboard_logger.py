"""``tensorboard``: TensorBoard event files through ``torch.utils.tensorboard``.

Scalars ``<stage>/<metric>`` per epoch (``train/test_elbo`` per VAE epoch, ``fit_prior/heldout_loss``
per fit epoch), the run's figures as images (``figures/<name>``), and the config as hparams (and
as text). Files go to ``<run>/logs/tensorboard`` unless ``log_dir`` is set; view them with
``tensorboard --logdir <run>/logs/tensorboard``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ncpvae import BuildContext, ComponentConfig, ExperimentLogger

EXTRA = "tensorboard"


class TensorBoardLogger(ExperimentLogger):
    """TensorBoard event files: scalars per epoch and fit epoch, figures, config as hparams."""

    name = "tensorboard"

    class Config(ComponentConfig):
        name: Literal["tensorboard"] = "tensorboard"
        log_dir: str | None = Field(
            None, min_length=1, description="event-file folder (None: <run>/logs/tensorboard)")

    @classmethod
    def from_config(cls, config: ComponentConfig, ctx: BuildContext) -> TensorBoardLogger:
        cls.import_extra("tensorboard", EXTRA)  # torch.utils.tensorboard needs the package
        return cls(config)

    def start(self, folder: Path, run_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(self.config.log_dir or folder))
        flat = {key: value if isinstance(value, (bool, int, float, str)) else str(value)
                for key, value in self.flat_config(config).items()}
        # the hparams summaries go into this run's own event file (add_hparams would open a
        # second run in a sub-folder)
        for summary in hparams(flat, {}):
            self.writer._get_file_writer().add_summary(summary)
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in flat.items()))
        self.writer.flush()

    def log_metrics(self, stage: str, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{stage}/{key}", value, step)
        self.writer.flush()  # a killed run keeps every epoch it logged

    def finish(self, run_dir: Path, figures: Sequence[Path]) -> None:
        from PIL import Image

        for path in figures:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"figures/{path.stem}", pixels, 0, dataformats="HWC")
        self.writer.close()
