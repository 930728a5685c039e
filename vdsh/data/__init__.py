"""Datasets, retrieval protocols and image transforms. Imports nothing else of vdsh."""

from vdsh.data.datasets import DATASETS, load
from vdsh.data.imageset import ImageSet
from vdsh.data.paths import DatasetNotFoundError, data_root
from vdsh.data.protocols import PROTOCOLS, ProtocolSplit, load_protocol, split_protocol

__all__ = ["DATASETS", "PROTOCOLS", "DatasetNotFoundError", "ImageSet", "ProtocolSplit", "data_root", "load", "load_protocol", "split_protocol"]
