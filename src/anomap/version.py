"""anomap's version, in a module of its own: every floor may read it."""

__version__ = "0.1.0"
