"""megaent: model-parallel RL for reasoning LMs with entropy control."""
__version__ = "0.1.0"
