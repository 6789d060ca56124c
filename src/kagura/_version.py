"""The package version, in a module of its own so that subpackages can name it without importing
the whole public API (which imports them)."""

__version__ = "0.1.0"
