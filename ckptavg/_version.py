"""The package version, in a module of its own so that no core module imports the package ``__init__``."""

__version__ = "0.1.0"
