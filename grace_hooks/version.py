"""The library's version, in a module of its own so any layer may read it without importing the
package's public face (``grace_hooks/__init__.py`` imports the model, which records the version)."""
__version__ = "0.2.0"
