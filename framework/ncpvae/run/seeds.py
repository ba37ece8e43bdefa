"""Named seed offsets: every random draw of a run is seeded from the run seed and one of these.

A stage draws from ``run.generator(OFFSET)`` (a torch Generator seeded with
``seed * 1000 + OFFSET``, :func:`torch_seed`) or from ``numpy_rng(seed, OFFSET)``, so stages are
independent of each other and of the order they run in, and a re-run gives the same numbers.
The values are part of the results: changing one changes every seeded number that uses it.
"""

from __future__ import annotations

import numpy as np

# --- training, fitting, sampling (run/) ------------------------------------------------------
#: the learned prior's fit (its minibatches, noise draws, initialization)
PRIOR_FIT = 2
#: the learned-prior summary after the fit: its one ``log Z`` estimate (``kl_gain`` is given it)
FIT_LOG_Z = 3
#: the held-out draws ``z ~ q(z|x)`` of that summary
FIT_HELDOUT = 4
#: the sample stage's panels: the base prior, the prior's own sampler, the run's sampler
SAMPLE_BASE = 5
SAMPLE_PRIOR = 6
SAMPLE_SAMPLER = 7
#: ``ncpvae sample``
SAMPLE_COMMAND = 8
#: the global RNG while the per-epoch test-set terms are computed during training (forked, so
#: that ``train.eval_size`` cannot change what training draws)
TRAIN_EVAL = 9

# --- evaluation (evaluation/) ----------------------------------------------------------------
#: numpy seeds of the disentanglement metrics: ``EVAL_METRICS + index`` in the metric table
EVAL_METRICS = 100
#: the held-out draws ``z ~ q(z|x)`` every row is compared with
EVAL_HELDOUT = 110
#: the learned prior's one ``log Z`` estimate of the evaluation (``kl_gain`` is given it)
EVAL_LOG_Z = 111
#: the likelihood bounds' importance draws (the same for the base prior and the run's prior)
EVAL_LIKELIHOOD = 112
#: the global RNG while the test-set loss terms are computed (the objective draws from it)
EVAL_VAE = 113
#: factor recovery: the factors of images rendered for it when the test set does not know its
#: images' factors
EVAL_FACTOR_RECOVERY = 114
#: the prior x sampler table: row i uses ``EVAL_ROWS + ROW_STRIDE * i`` plus one of the below
EVAL_ROWS = 120
ROW_STRIDE = 10
ROW_DRAW = 0  # torch: the row's latents
ROW_PRIOR_FIT = 1  # numpy: MMD permutations and the two-sample classifier
ROW_SAMPLE_QUALITY = 2  # numpy: KID subsets


def torch_seed(seed: int, offset: int) -> int:
    """The torch seed of stage ``offset`` of a run seeded with ``seed``."""
    return seed * 1000 + offset


def numpy_rng(seed: int, offset: int) -> np.random.Generator:
    """A numpy Generator for stage ``offset`` of a run seeded with ``seed``."""
    return np.random.default_rng([seed, offset])


def row_offset(index: int, part: int) -> int:
    """The offset of ``part`` (``ROW_DRAW`` ...) of row ``index`` of the evaluation table."""
    return EVAL_ROWS + ROW_STRIDE * index + part
