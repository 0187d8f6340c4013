"""grace_hooks: lifelong, non-destructive knowledge editing of Hugging Face language models.

Edits live in edit packs (JSON + safetensors) applied through forward hooks; base weights are
never written, and removing a pack is the rollback.
"""
from .errors import FingerprintMismatch, GraceHooksError, PackError
from .model import EditableModel, PackInfo
from .requests import EditRequest, read_requests
from .version import __version__

__all__ = ["EditableModel", "EditRequest", "PackInfo", "read_requests", "GraceHooksError", "PackError", "FingerprintMismatch", "__version__"]
