"""``python -m grace_hooks.cli``: the same as the ``grace-hooks`` command."""
from . import main

if __name__ == "__main__":
    main()
