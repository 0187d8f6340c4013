"""``grace-hooks``: the command line. Output for people is printed here; the library only logs.

Every :class:`~grace_hooks.errors.GraceHooksError` is shown as ``error: <message>`` with exit
code 2 (no traceback).
"""
from .group import main
from . import edit_cmds, pack_cmds, run_cmds  # noqa: F401  (each registers its commands on main)

__all__ = ["main"]
