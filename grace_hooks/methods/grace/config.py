from __future__ import annotations

from dataclasses import dataclass, field

from ...config import option
from ...engine.spans import SCOPE_HELP, SCOPES
from ...store.schema import MAX_ABS
from ...store.typed import must
from ...tokens import KEY_POSITIONS

# GRACE edits a late layer: GPT2-XL block 35 of 48 in the paper's code.
DEFAULT_RELATIVE_DEPTH = 35 / 48


@dataclass
class GraceConfig:
    layer: int | None = option(None, f"block whose MLP output is edited; None = {DEFAULT_RELATIVE_DEPTH:.2f} of the depth (the paper's GPT2-XL block 35/48)")
    point: str = option("mlp_out", "hook point inside the block (see architectures.ARCHITECTURES)")
    key: str = option("prompt_last", "token whose site input is the key: the paper's last prompt token, or the last subject token", KEY_POSITIONS)
    eps_init: float = option(1.0, "radius (Euclidean) of a new key: GRACE's epsilon_init")
    replacement: str = option("in_scope", "'in_scope': every position whose own input is within a key's radius; 'last': only the last real position of each forward (the paper's query token)", ("in_scope", "last"))
    scope: str = option("span", SCOPE_HELP + "; a GRACE key's subject must occur at or before the position", SCOPES)
    end_answer: bool = option(True, "also train the token the base model writes after the answer, so that the answer ends there instead of repeating its last piece ('Zorbatownownown...')")
    chat_form: bool = option(False, "also key each edit at the end of its prompt asked as a user turn of the tokenizer's chat template, the value trained so the answer opens with the target (no effect without a template; scope 'span' keeps the key to forwards that name the subject)")
    value_init: str = option("cold", "'cold': uniform random (the paper's default); 'warm': the site's current output at the key", ("cold", "warm"))
    lr: float = option(1.0, "Adam learning rate for the values (paper: 1.0)")
    n_iter: int = option(100, "most Adam steps (paper: 100); stops once every target token is the argmax")
    seed: int = option(0, "seed of the cold value initialisation")


@dataclass
class Shrink:
    """A key of an earlier pack whose radius this pack shrinks while it is loaded (a GRACE split)."""

    site: str
    pack_id: str  # the earlier pack's
    key: int = must("a key index >= 0", lambda k: None if k >= 0 else "must be a key index >= 0")
    radius: float = must(f"a number within +-{MAX_ABS:g}", lambda r: None if abs(r) <= MAX_ABS else
                         f"must be a number within +-{MAX_ABS:g}")


@dataclass
class GraceState:
    """A GRACE pack's own data: each key's label (its answer), by site, and the shrinks of earlier keys."""

    labels: dict[str, list[str]] = field(default_factory=dict)
    shrink: list[Shrink] = field(default_factory=list)
