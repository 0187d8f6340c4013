from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ...bases.architectures import arch_spec, num_layers
from ...config import option
from ...engine.spans import SCOPE_HELP, SCOPES
from ...errors import ConfigError
from ...locate.statistics import CorpusSpec
from ...locate.target_vectors import TargetVectorConfig

MODES = ("global", "routed")
# tuned on CounterFact train (1,000 edits), checked on val (benchmarks/results-pages/routing.md, issue 16)
SPAN_RADIUS_SCALE, KEY_RADIUS_SCALE = 3.0, 1.1
LLAMA3_MOM2_WEIGHT, LLAMA3_D_IN = 15000.0, 14336  # ENCORE's hparams/ENCORE/llama3-8b.json, down_proj input width


@dataclass
class SolveConfig(TargetVectorConfig):
    """MEMIT's pipeline (Meng et al. 2023), shared by every method that solves for a layer update
    (the target-vector options lr, steps, kl_factor, weight_decay, clamp, stop and batch_size come
    from TargetVectorConfig)."""

    layers: str | None = option(None, "edited blocks, e.g. '3-7' or '3,4,5'; None = 5 consecutive blocks centred near "
                                      "a sixth of the depth (3-7 of 30), as MEMIT/ENCORE edit 4-8 of Llama3-8B's 32; "
                                      "3 on Gemma 2/3 (2-4 of 18: spread wider, the update overshoots)")
    point: str = option("mlp_out", "hook point inside each block (see architectures.ARCHITECTURES)")
    scope: str = option("span", SCOPE_HELP, SCOPES)
    radius_scale: float | None = option(None, "with router keys: a key's radius is this times its spread (largest distance "
                                              "of a context-prefixed sample to the mean key), at least 5% of its norm; "
                                              "None = 3.0 with scope 'span' (one mean key per request), 1.1 with 'key' "
                                              "(the mean key and each sample)")
    corpus_margin: float = option(0.9, "with router keys and scope 'key': a radius is also at most this times the key's "
                                       "distance to the nearest of corpus_probe tokens of the C0 corpus (0 = off)")
    corpus_probe: int = option(4096, "with router keys: corpus tokens whose site inputs bound the radii")
    mom2_weight: float | None = option(None, "lambda, the weight of C0; None = 15000 x d_in / 14336: MEMIT/ENCORE's "
                                             "Llama3-8B value scaled to the site's input width (E[k^T C0^-1 k] = d_in, "
                                             "so the new keys' weight against C0 stays the same)")
    corpus: str | None = option(None, "text file (blank-line separated paragraphs) for C0; None = text sampled "
                                      "from the model itself (no pre-training text offline)")
    corpus_texts: int = option(256, "model-sampled texts for C0 when no corpus file is given")
    corpus_tokens: int = option(128, "tokens per model-sampled text")
    max_tokens: int = option(100_000, "at most this many key vectors in C0")
    n_prefixes: int = option(5, "model-written context prefixes besides the bare prompt (MEMIT: 5, of 10 tokens)")
    prefix_tokens: int = option(10, "length of each model-written context prefix (MEMIT: 10)")
    passes: int = option(1, "sweeps over the edited blocks: each later sweep writes what the update so far leaves "
                            "between the last edited block's output and z, with the first sweep's keys (so the pack "
                            "keeps its size: only U grows by the new residuals); 1 = MEMIT")
    target_prefixes: int | None = option(None, "context prefixes besides the bare prompt that target vectors are "
                                               "optimised on (the keys and router radii still use n_prefixes); "
                                               "None = n_prefixes, as MEMIT")

    retired: ClassVar[dict[str, tuple[Any, str]]] = {
        "z_through_norm": (False, "on Gemma 2/3 weight deltas now act after the post-MLP norm (architectures."
                                  "ArchSpec.written_at), so no norm stands between an update and the residual stream"),
    }

    def __post_init__(self) -> None:
        if self.passes < 1:
            raise ConfigError(f"passes={self.passes}: at least one sweep over the edited blocks is needed (1 = MEMIT)")

    def target_prefix_count(self) -> int:
        return self.n_prefixes if self.target_prefixes is None else min(self.target_prefixes, self.n_prefixes)

    def route_radius_scale(self) -> float:
        if self.radius_scale is not None:
            return self.radius_scale
        return SPAN_RADIUS_SCALE if self.scope == "span" else KEY_RADIUS_SCALE

    def corpus_spec(self) -> CorpusSpec:
        return CorpusSpec(self.corpus, self.corpus_texts, self.corpus_tokens)

    def target_config(self) -> TargetVectorConfig:
        return TargetVectorConfig(**{f.name: getattr(self, f.name) for f in fields(TargetVectorConfig)})

    def c0_weight(self, d_in: int) -> float:
        return self.mom2_weight if self.mom2_weight is not None else LLAMA3_MOM2_WEIGHT * d_in / LLAMA3_D_IN

    def layer_list(self, model) -> list[int]:
        """The edited blocks of ``model``, ascending; by default its architecture's ``spread_blocks``
        consecutive ones centred near a sixth of the depth. The last one must be below the last block
        (its output is where target vectors are optimised)."""
        n_layers, spread = num_layers(model), arch_spec(model).spread_blocks
        if self.layers is None:
            start = round(n_layers / 6) - spread // 2
            return list(range(max(0, start), min(n_layers - 1, start + spread)))
        try:
            out: set[int] = set()
            for part in str(self.layers).replace(" ", "").split(","):
                lo, _, hi = part.partition("-")
                out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ConfigError(f"layers={self.layers!r}: expected e.g. '3-7' or '3,4,5'") from None
        layers = sorted(out)
        if not layers or layers[0] < 0 or layers[-1] >= n_layers - 1:
            raise ConfigError(f"layers={self.layers!r}: edited blocks must lie in 0..{n_layers - 2} "
                              f"(the model has {n_layers}; the last block's output cannot carry a target vector)")
        return layers


@dataclass
class DeltaConfig(SolveConfig):
    """MEMIT (Meng et al. 2023): a low-rank weight delta per edited block."""

    mode: str = option("routed", "'global': dW acts on every token (the papers); 'routed': only at positions the "
                                 "router puts in scope of the pack's keys (unrelated text stays bit-identical)", MODES)


@dataclass
class EncoreConfig(DeltaConfig):
    """ENCORE (Gupta et al. 2025): most-probable early stopping and a norm-constrained update."""

    stop: str = option("most_probable", "target vectors: 'most_probable' (ENCORE: stop once the target is the argmax "
                                        "on every rewrite prompt) or 'loss' (MEMIT)", ("loss", "most_probable"))
    # Tuned for routed edits on CounterFact train (benchmarks/results-pages/speed.md, issue 17); the paper's
    # values (lr 0.5, stop_prob 0, target_prefixes 5, batch_size 8, routed_c0_fraction 1) remain options.
    lr: float = option(1.0, "Adam learning rate of delta (ENCORE/MEMIT: 0.5; 1.0 stops in fewer steps)")
    stop_prob: float = option(0.8, "a margin on the most-probable stop: every rewrite prompt must also give each target "
                                   "token this probability on average (0 = ENCORE's bare argmax, whose edits often fall "
                                   "short once spread over the blocks)")
    target_prefixes: int | None = option(0, "context prefixes that target vectors are optimised on besides the bare prompt "
                                            "(each costs as much as the bare prompt; the router keys still use n_prefixes); "
                                            "None = n_prefixes, as the paper")
    batch_size: int = option(64, "requests whose target vectors are optimised together")
    # issue 35's lever table (benchmarks/results-pages/questions.md): on 200 CounterFact train edits the question row
    # raised question success 52% -> 60.5% at 2.7x the seconds per edit (71.5% at 4.2x with
    # question_stop); on 50 val edits 42% -> 58%; on 200 val edits question_stop 55% -> 75% (other wording
    # 51.5% -> 63.5%), harm unchanged
    question_form: bool = option(True, "also optimise each target vector on its relation's edit question asked in "
                                       "chat form, the target opening the answer (grace_hooks.questions): edits reach "
                                       "questions users ask; False = the paper (cloze prompts only)")
    question_stop: bool = option(True, "with question_form: the most-probable stop also waits for the question's row "
                                        "(False: fewer steps, the question only pulling on the loss; 200 val edits: "
                                        "question success 55% against 75%)")
    routed_c0_fraction: float = option(0.1, "in routed mode, C0's weight is this fraction of mom2_weight's value: the router "
                                            "already keeps other text out of scope, and a lighter C0 lets the update "
                                            "reach z (1 = the paper's weight)")
    passes: int = option(2, "sweeps over the edited blocks; the second writes what the first left between the update's "
                            "output and z (100 CounterFact edits, SmolLM2: z reached 0.70 -> 0.90, landed 93% -> 100%, "
                            "about 4% more time; benchmarks/results-pages/speed.md) (1 = the paper)")
    norm_lambda: float = option(20.0, "lambda_N on |dW|^2 (ENCORE's update_norm_lambda for Llama3-8B)")
    previous_edits: bool | None = option(None, "add sum K_p K_p^T of the keys of every loaded delta pack at the site "
                                               "(the paper); None = in global mode only: a routed delta acts only on "
                                               "its own subjects, and with 5,000 edits loaded the term held a new batch "
                                               "to 53% landed against 100% without it, earlier edits holding alike "
                                               "(benchmarks/results-pages/scale.md)")

    def c0_weight(self, d_in: int) -> float:
        return super().c0_weight(d_in) * (self.routed_c0_fraction if self.mode == "routed" else 1.0)

    def keeps_previous_edits(self) -> bool:
        return self.mode == "global" if self.previous_edits is None else self.previous_edits


@dataclass
class DeltaState:
    """For a person reading the header (the code reads the typed config): the mode the delta acts in,
    and the corpus of each site's C0; read by the code: the segments of a squashed chain."""

    mode: str | None = None  # 'routed' or 'global'
    corpus: dict[str, str] | None = None  # site -> its C0's corpus source
    segments: list[int] | None = None  # a squashed chain: the requests of each of its packs, in order


@dataclass
class OEditConfig(DeltaConfig):
    """O-Edit (Cai & Cao 2024): every update orthogonal to the earlier updates at its site."""

    orthogonal_to: str = option("updates", "'updates': the row spaces of earlier deltas (their V factors), so "
                                           "<dW_new, dW_old>_F = 0; 'keys': earlier edit keys, so dW_new K_old = 0",
                                ("updates", "keys"))
