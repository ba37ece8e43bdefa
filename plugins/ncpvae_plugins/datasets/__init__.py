"""Built-in dataset plugins: ``sprites`` (the default, generated), ``mnist``, ``fashion-mnist``,
``digits``, ``npz`` (your own arrays), ``imagefolder`` (your own image files) and ``dsprites``
(the real dSprites file).

This package is a plugin module like any third-party one: :func:`ncpvae_register_datasets` returns
the classes. The dataset modules are imported lazily by the hook, so importing the package stays cheap; their
shared split helpers live in :mod:`ncpvae.splits`.
"""

from __future__ import annotations

from ncpvae import hookimpl


@hookimpl
def ncpvae_register_datasets() -> list[type]:
    """The built-in dataset plugin classes."""
    from ncpvae_plugins.datasets.colour import CelebADataset, CIFAR10Dataset, SVHNDataset
    from ncpvae_plugins.datasets.digits import DigitsDataset
    from ncpvae_plugins.datasets.dsprites import DSpritesDataset
    from ncpvae_plugins.datasets.imagefolder import ImageFolderDataset
    from ncpvae_plugins.datasets.npz import NpzDataset
    from ncpvae_plugins.datasets.sprites import SpritesDataset
    from ncpvae_plugins.datasets.torchvision_sets import FashionMNISTDataset, MNISTDataset

    return [
        SpritesDataset,
        MNISTDataset,
        FashionMNISTDataset,
        DigitsDataset,
        NpzDataset,
        ImageFolderDataset,
        DSpritesDataset,
        CIFAR10Dataset,
        SVHNDataset,
        CelebADataset,
    ]
