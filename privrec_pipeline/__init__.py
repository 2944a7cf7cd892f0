"""privrec: privacy-preserving recommendation training pipeline."""
__version__ = "0.1.0"
