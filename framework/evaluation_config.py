"""The ``[evaluate]`` section of a run config (sizes of every evaluation metric)."""

from __future__ import annotations

from pydantic import Field

from ncpvae.component import StrictModel


class EvaluateConfig(StrictModel):
    """What ``ncpvae evaluate`` (and the end of ``ncpvae train``) computes, and at which sizes."""

    enabled: bool = Field(True, description="run the evaluation stage at the end of `ncpvae train`")
