"""``python -m ncpvae ...``: the same command line as the ``ncpvae`` script (what ``torchrun -m
ncpvae train ...`` launches on every rank)."""

import sys

from ncpvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
