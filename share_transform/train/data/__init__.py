"""Datasets of the recipes: CIFAR-10/100 files, ZCA and mean/std preprocessing (see :mod:`.cifar`)."""

from .cifar import (
    CIFAR_DIRS,
    ZCA,
    ChannelNorm,
    CifarData,
    CifarDataset,
    CifarSplit,
    DataError,
    Preprocessing,
    download_cifar,
    fit_preprocessing,
    load_cifar,
    load_preprocessing,
    read_cifar,
    save_preprocessing,
    write_cifar,
    zca_cache_path,
)

__all__ = [
    "CIFAR_DIRS",
    "ZCA",
    "ChannelNorm",
    "CifarData",
    "CifarDataset",
    "CifarSplit",
    "DataError",
    "Preprocessing",
    "download_cifar",
    "fit_preprocessing",
    "load_cifar",
    "load_preprocessing",
    "read_cifar",
    "save_preprocessing",
    "write_cifar",
    "zca_cache_path",
]
