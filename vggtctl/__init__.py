"""vggtctl: operations console for precomputed VGGT feature caches."""

__version__ = "0.1.0"
