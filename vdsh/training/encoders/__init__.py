"""Every `nn.Module` a model file can hold, the model file itself (`model.py`) and the registry of kinds."""
