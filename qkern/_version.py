"""qkern's version, in a module of its own so that any module may read it without importing
the package's public surface (which would be an import cycle)."""

__version__ = "0.1.0"
