"""Binary codes, Hamming search over FAISS binary indexes, and retrieval metrics. Imports nothing else of vdsh."""
