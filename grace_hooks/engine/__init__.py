"""The hook engine: how loaded packs act on a forward, without knowing any method.

- ``effects``: the effect interface a method family implements (``Effect``, ``EffectLayer``);
- ``router`` and ``spans``: which loaded key, if any, covers each position, and the subject spans
  that keep a key in scope;
- ``runtime`` and ``forward_context``: the site hooks that compose every loaded effect, and what
  they know of the forward they run in (per thread);
- ``loaded``: the read-only view of what is loaded that a method computes against;
- ``memo``: the per-model cache of what derives from the weights;
- ``health``: norm growth and activation drift of an edited model against its base.
"""
