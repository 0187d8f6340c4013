"""The locate-then-edit toolkit that MEMIT-family methods compose (no method lives here):

- ``subject_keys``: keys at the last subject token, averaged over model-written context prefixes;
- ``target_vectors``: the vector z each edit should write at the last edited block;
- ``covariance``: C0 = E[k k^T] at a site from a corpus, cached on disk by content;
- ``statistics``: the model's measurements (digest, prefixes, corpus, C0, corpus probes), once per
  weight version, held in the model's :class:`~grace_hooks.engine.memo.WeightMemo`;
- ``linalg``: the closed-form solves and projections;
- ``replay``: re-running the blocks above a layer from recorded inputs (with a KV cache).
"""
