"""The product's version: a leaf module, so any layer can read it without importing more."""

__version__ = "0.1.0"
