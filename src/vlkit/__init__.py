"""vlkit: vision & language with transformers.

``vlkit.load(path)`` reads a vlkit model folder, a run folder or a HF checkpoint folder.
"""
from vlkit.checkpoints.hub import load

__version__ = "0.1.0"
__all__ = ["load", "__version__"]
