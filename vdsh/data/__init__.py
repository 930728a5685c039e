"""Datasets, retrieval protocols and image transforms. Imports nothing else of vdsh."""
