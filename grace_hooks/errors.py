"""Exceptions raised by grace_hooks. Each message says what was wrong and how to fix it."""


class GraceHooksError(Exception):
    """Base class of every error this library raises on purpose."""


class EditRequestError(GraceHooksError, ValueError):
    """An edit request is malformed (empty target, subject missing from the prompt, ...)."""


class EditError(GraceHooksError):
    """An edit could not be computed into a usable pack (e.g. its solve gave non-finite values)."""


class PackError(GraceHooksError):
    """An edit pack on disk is missing, corrupt, truncated, of an unknown version or hostile."""


class PackNameError(PackError, ValueError):
    """A pack name would escape the adapters directory or is otherwise unusable."""


class FingerprintMismatch(PackError):
    """A pack was made for a different base model."""


class ArchitectureError(GraceHooksError, KeyError):
    """The model's architecture is not in the table of supported architectures."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(GraceHooksError, ValueError):
    """A method configuration has an unknown field or a bad value."""
