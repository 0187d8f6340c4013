"""grace_hooks: lifelong, non-destructive knowledge editing of Hugging Face language models.

Edits live in edit packs (JSON + safetensors) applied through forward hooks; base weights are
never written, and removing a pack is the rollback.
"""
__version__ = "0.2.0"

from .errors import FingerprintMismatch, GraceHooksError, PackError  # noqa: E402
from .model import EditableModel, PackInfo  # noqa: E402
from .requests import EditRequest, read_requests  # noqa: E402

__all__ = ["EditableModel", "EditRequest", "PackInfo", "read_requests", "GraceHooksError", "PackError", "FingerprintMismatch", "__version__"]
