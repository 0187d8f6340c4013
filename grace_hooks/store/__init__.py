"""Packs on disk, below the methods that make them:

- ``packs``: the pack format (``edit_pack.json`` + ``edit_pack.safetensors``), save, load, list;
- ``header``: the header's declared schema, and where a pack's config, state and routing become JSON and back;
- ``typed``: the one validator behind it (typed dataclasses from and to JSON, errors naming the field);
- ``schema``: what a method declares its packs hold at each site, the check against it, tensor names;
- ``io``: reading a pack's files defensively (sizes, JSON and safetensors headers);
- ``adapters_dir``: an adapters folder shared by processes (one writer, crash-safe saves).
"""
