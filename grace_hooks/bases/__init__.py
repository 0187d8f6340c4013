"""Base models, below everything that edits them:

- ``architectures``: where the blocks are in each supported ``model_type`` and where each site
  (hook point) lives;
- ``hooks``: the one owner of every torch hook the library registers, and forwards that stop early;
- ``embedded``: the embedded models (GGUF files carried by PyPI wheels, checked against pinned hashes);
- ``loading``: resolving a base model from a hub id, a folder, a GGUF file or an embedded name.
"""
