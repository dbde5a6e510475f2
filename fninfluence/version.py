"""The library's version, in a module of its own: stores record it, and this module imports nothing."""

__version__ = "0.2.0"
