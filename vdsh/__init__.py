"""vdsh: supervised deep hashing for image retrieval.

Data flows one way: `vdsh.data` (datasets, protocols) -> `vdsh.training` (encoders, trainers) ->
`vdsh.index` (codes, FAISS binary indexes, metrics) -> `vdsh.app` (CLI, server).
"""

__version__ = "0.1.0"
