"""Everything a method author needs, in one import: the method contract, the effect contract, the
pack schema, and the helpers a method's compute step uses.

    from grace_hooks.method_kit import EditMethod, ComputedEdit, Effect, EffectLayer, register, ...

A method is a class deriving from :class:`EditMethod` (``name``, a dataclass ``config_class``, a
dataclass ``state_class`` when its packs keep data of their own (default :class:`NoState`),
``compute``, ``site_layouts``, ``contributions``); its packs' tensors are named by :func:`tensor_name`
(:func:`named` names a whole site -> part -> tensor mapping); its effect at a site is an
:class:`Effect` whose :class:`EffectLayer` composes every loaded pack of that kind. A layer's
``gate(x, valid, past, context)`` sees of the forward only a :class:`GateContext`: the thread's
options (read-only) and a dict it keeps between the thread's forwards.

While ``compute`` runs, the :class:`EditContext` is all the method holds of the edited model: it
reads what is loaded through ``ctx.loaded`` (:class:`LoadedView`, :class:`LoadedSite`) and never
gets an effect layer. To read its own family's earlier effects at a site, a family declares a
:class:`LayerView` subclass beside its layer (``of = ItsLayer`` and one method per read, each
returning a new tensor or an immutable value) and asks ``ctx.loaded.site(name).view(ItsView)``.

Register it in-process with :func:`register`, or ship it as its own distribution that declares it
in the entry point group ``grace_hooks.methods`` (:data:`ENTRY_POINT_GROUP`) so the CLI, the server
and ``from_pretrained`` find its packs. ``tests/plugins/steer`` is a complete example; the ``nudge``
family in ``tests/test_custom_method.py`` has a gate and a view of its own.
"""
from .bases.architectures import Site, num_layers
from .config import option
from .engine.effects import Effect, EffectLayer, Gate, GateContext, Hits, Plan, stored
from .engine.loaded import LayerView, LoadedSite, LoadedView
from .engine.runtime import SiteContribution
from .engine.spans import KeyRouting
from .errors import ConfigError, PackError
from .methods.base import ComputedEdit, EditContext, EditMethod
from .methods.registry import ENTRY_POINT_GROUP, register, unregister
from .requests import EditRequest
from .store.header import NoState
from .store.packs import EditPack
from .store.schema import TensorSpec, named, split_tensor_name, tensor_name

__all__ = ["ComputedEdit", "ConfigError", "ENTRY_POINT_GROUP", "EditContext", "EditMethod", "EditPack", "EditRequest",
           "Effect", "EffectLayer", "Gate", "GateContext", "Hits", "KeyRouting", "LayerView", "LoadedSite", "LoadedView",
           "NoState", "PackError", "Plan", "Site", "SiteContribution", "TensorSpec", "named", "num_layers", "option",
           "register", "split_tensor_name", "stored", "tensor_name",
           "unregister"]
