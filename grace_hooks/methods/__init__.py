"""Edit methods, registered by name. Importing this package registers the built-in methods."""
from .base import EditContext, EditMethod, ComputedEdit, get_method, method_names, register

from . import comeba, delta, grace  # noqa: F401,E402  (registers grace, memit, encore, oedit, comeba_hk)

__all__ = ["EditContext", "EditMethod", "ComputedEdit", "get_method", "method_names", "register"]
