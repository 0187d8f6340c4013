"""Packs on disk, below the methods that make them:

- ``packs``: the pack format (``edit_pack.json`` + ``edit_pack.safetensors``), save, load, list;
- ``schema``: what a method declares its packs hold at each site, and the check against it;
- ``io``: reading a pack's files defensively (sizes, JSON and safetensors headers);
- ``adapters_dir``: an adapters folder shared by processes (one writer, crash-safe saves).
"""
