"""Edit methods, registered by name. Importing this package registers the built-in methods."""
from .base import EditContext, EditMethod, ComputedEdit
from .registry import ENTRY_POINT_GROUP, get_method, method_class, method_names, register, unregister

from . import comeba, delta, grace  # noqa: F401,E402  (registers grace, memit, encore, oedit, comeba_hk)
from ..config import DEFAULT_METHOD  # noqa: E402

__all__ = ["DEFAULT_METHOD", "ENTRY_POINT_GROUP", "EditContext", "EditMethod", "ComputedEdit", "get_method", "method_class",
           "method_names", "register", "unregister"]
