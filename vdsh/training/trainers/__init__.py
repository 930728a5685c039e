"""The training methods, one module per method; `registry.py` names them."""
