"""One owner for every hook the library registers, so none can leak."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle


class HookOwner:
    """Registers forward / pre-forward hooks and removes them all, always.

    ``scoped()`` gives a child owner whose hooks are removed when the block exits, also on an
    exception, which is how temporary hooks (key capture, value training) are used.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable, *, prepend: bool = False, always_call: bool = False) -> RemovableHandle:
        handle = module.register_forward_hook(fn, prepend=prepend, always_call=always_call)
        self._handles.append(handle)
        return handle

    def pre_forward(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False, prepend: bool = False) -> RemovableHandle:
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs, prepend=prepend)
        self._handles.append(handle)
        return handle

    def remove(self, handle: RemovableHandle) -> None:
        handle.remove()
        self._handles = [h for h in self._handles if h is not handle]

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    @contextlib.contextmanager
    def scoped(self) -> Iterator["HookOwner"]:
        child = HookOwner()
        try:
            yield child
        finally:
            child.remove_all()


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` stops asking for gradients inside the block; the flags come back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Reached(Exception):
    """Ends a forward at the module that :func:`forward_until` waits for."""


def _reached(module, args, output):
    raise _Reached


def forward_until(model: nn.Module, stop_at: nn.Module, **inputs) -> None:
    """``model(**inputs)`` only as far as the end of ``stop_at``'s forward: the hooks registered before
    on it and everything it runs fire, nothing after it does (the blocks above and the output head are
    wasted work when one reads activations at an early block). The model's own forward hooks that ask
    to be always called (the edit runtime's per-forward context) still run."""
    with HookOwner().scoped() as scope:
        scope.forward(stop_at, _reached)
        try:
            model(**inputs)
        except _Reached:
            pass


@contextlib.contextmanager
def head_only_at(model: nn.Module | None, index) -> Iterator[bool]:
    """Inside the block the output embedding of ``model`` (a causal LM) runs on positions
    ``index = (rows, cols)`` only, so its logits come out shaped ``rows.shape + (vocab,)`` (the head
    is a small model's costliest layer); yields False where the model has no such head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield False
        return
    with HookOwner().scoped() as scope:
        def narrow(module, args):  # the index moves to the head input's device (a model split over GPUs)
            x = args[0]
            return (x[index[0].to(x.device), index[1].to(x.device)], *args[1:])

        scope.pre_forward(head, narrow)
        yield True


def count_hooks(model: nn.Module) -> int:
    """Number of forward and pre-forward hooks registered anywhere in ``model`` (for tests)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
