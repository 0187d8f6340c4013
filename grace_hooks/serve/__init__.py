"""``grace-hooks serve``: an OpenAI-compatible server whose edits go live and roll back while it
runs. Needs the ``serve`` extra (``pip install grace_hooks[serve]``: FastAPI and uvicorn)."""
from .app import API_KEY_ENV, ServeConfig, create_app
from .live_packs import LivePacks, NewPack, restack
from .run import running, serve

__all__ = ["API_KEY_ENV", "LivePacks", "NewPack", "ServeConfig", "create_app", "restack", "running", "serve"]
