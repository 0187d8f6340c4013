"""Second-moment statistics of the keys entering a site: C0 = E[k k^T] (uncentred), from a corpus.

Locate-then-edit methods (MEMIT and its descendants) preserve what a layer does on "everything
else" through C0. Offline there is no Wikipedia, so the default corpus is text sampled from the
model itself (it says so in the log and in what it returns); any list of strings or a text file
can be passed instead. Statistics are streamed with a progress bar and cached on disk, keyed by
content: the model's weights, the site, the corpus, the sample count and the dtype.
"""
from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from ..bases.architectures import Site, deepest
from ..bases.hooks import HookOwner, forward_until
from ..progress import Progress
from .kept import cache_folder, kept_or_made, read_json

log = logging.getLogger(__name__)

SELF_SAMPLED = "model-sampled"
SHIPPED_CORPORA = "data/corpus"  # package folder of model-sampled corpora, named as the cache names them
SHIPPED_ALIASES = "aliases.json"  # in that folder: corpus file name -> {"file": a shipped file, "sampled_by", "for"}
_WHERE_LOADED = ("_name_or_path", "transformers_version")  # config entries that say nothing of the weights


@dataclass(frozen=True)
class Corpus:
    """Texts to measure on. ``source`` names where they came from (a file, ``model-sampled``, ...)."""

    texts: tuple[str, ...]
    source: str

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(hashlib.sha256(t.encode()).digest())
        return h.hexdigest()[:32]

    @classmethod
    def from_file(cls, path: str | Path) -> "Corpus":
        """Paragraphs (blank-line separated) of a UTF-8 text file."""
        path = Path(path)
        texts = tuple(p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip())
        if not texts:
            raise ValueError(f"corpus file {path} holds no text")
        return cls(texts, str(path))


def sample_corpus(model, tokenizer, n_texts: int = 64, n_tokens: int = 128, seed: int = 0,
                  batch_size: int = 16) -> Corpus:
    """Texts sampled from ``model`` itself (temperature 1), each started from the BOS token (or
    the EOS token where there is none): a stand-in for the pre-training text we do not have."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    texts = []
    device = next(model.parameters()).device
    log.info("covariance corpus: sampling %d texts of %d tokens from the model itself (no corpus given or shipped for "
             "this model; once per model, kept in the cache afterwards)", n_texts, n_tokens)
    progress = Progress(log, n_texts, "C0 corpus: sampling texts from the model", "texts")
    for i in range(0, n_texts, batch_size):
        n = min(batch_size, n_texts - i)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        ids = torch.full((n, 1), start, dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 temperature=1.0, max_new_tokens=n_tokens, min_new_tokens=n_tokens, pad_token_id=pad)
        texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
        progress.update(n)
    log.info("covariance corpus: sampled %d texts in %.0f s", n_texts, progress.close())
    return Corpus(tuple(t for t in texts if t.strip()), f"{SELF_SAMPLED}:seed={seed}:n={n_texts}:tokens={n_tokens}")


def cached_sample_corpus(model, tokenizer, model_hash: str, n_texts: int = 64, n_tokens: int = 128, seed: int = 0,
                         cache: Path | None | bool = True) -> Corpus:
    """:func:`sample_corpus`, kept on disk per (model weights, seed, size): sampling takes minutes.
    Looked up in the cache folder, then among the corpora shipped with the package (those the
    embedded models use, so a first edit on a fresh machine need not sample), then sampled."""
    return kept_or_made(cache_folder("corpus", cache), corpus_file_name(model_hash, seed, n_texts, n_tokens), _read_corpus,
                        lambda name: shipped_corpus(name), lambda: sample_corpus(model, tokenizer, n_texts, n_tokens, seed),
                        lambda c: {"texts": list(c.texts), "source": c.source}, "covariance corpus")


def corpus_file_name(model_hash: str, seed: int, n_texts: int, n_tokens: int) -> str:
    """How a model-sampled corpus is named in the cache and among the shipped ones."""
    return f"{model_hash}-seed{seed}-n{n_texts}-t{n_tokens}.json"


def shipped_corpus(name: str) -> Corpus | None:
    """The corpus the package ships for ``name`` (a :func:`corpus_file_name`), or None: the file of that
    name, or the one ``aliases.json`` names for it (another model's sampled text, shipped for a model
    whose own would take too long to sample; its source says so)."""
    folder = resources.files("grace_hooks").joinpath(SHIPPED_CORPORA)
    where = folder.joinpath(name)
    if where.is_file():
        return _read_corpus(where.read_text(encoding="utf-8"))
    aliases = folder.joinpath(SHIPPED_ALIASES)
    alias = json.loads(aliases.read_text(encoding="utf-8")).get(name) if aliases.is_file() else None
    corpus = shipped_corpus(alias["file"]) if isinstance(alias, dict) and alias.get("file") != name else None
    if corpus is None:
        return None
    return Corpus(corpus.texts, f"{corpus.source}, sampled by {alias.get('sampled_by', 'another model')}, shipped for "
                                f"{alias.get('for', 'this model')}")


def _read_corpus(text: str) -> Corpus | None:
    """A stored corpus, or None when the text is not one (bad JSON, wrong types, no text)."""
    stored = read_json(text)
    if not (isinstance(stored, dict) and isinstance(stored.get("source"), str) and isinstance(stored.get("texts"), list)
            and stored["texts"] and all(isinstance(t, str) for t in stored["texts"])):
        return None
    return Corpus(tuple(stored["texts"]), stored["source"])


def site_inputs(model, tokenizer, sites: list[Site], texts, max_tokens: int, max_length: int = 256) -> dict[str, torch.Tensor]:
    """The inputs of each site at the first ``max_tokens`` tokens of ``texts`` (one text per forward)."""
    out: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    device = next(model.parameters()).device
    count = 0
    with HookOwner().scoped() as scope, torch.inference_mode():
        for site in sites:
            # float32 site inputs whatever the model's dtype: the router radii are bounded by distances to them
            scope.forward(site.module(model), lambda m, a, o, name=site.name: out[name].append(a[0][0].float().cpu()))
        for text in texts:
            if count >= max_tokens:
                break
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).to(device)
            forward_until(model, deepest(model, sites), **enc)
            count += enc["input_ids"].shape[1]
    return {name: torch.cat(v)[:max_tokens] for name, v in out.items()}


def _token_count(tokenizer, corpus: Corpus, max_length: int) -> int:
    """The tokens ``corpus`` gives, each text cut at ``max_length`` as the measurement cuts it (for progress)."""
    return sum(len(ids) for ids in tokenizer(list(corpus.texts), truncation=True, max_length=max_length)["input_ids"])


def model_digest(model) -> str:
    """A hash of the config and every parameter: the statistics of a site depend on all the layers
    below it, not on where the weights were loaded from or by which transformers release."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _WHERE_LOADED}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy())  # the array's own buffer: no copy of the bytes
    return h.hexdigest()[:32]


@dataclass
class SecondMoment:
    """E[k k^T] over ``count`` key vectors at ``site``, kept as the (d_in, d_in) matrix or, when there
    are no more keys than dimensions, as the keys themselves: ``rows`` (count, d_in), E[k k^T] = rows^T
    rows / count, a rank-``count`` matrix that is smaller to keep and cheaper to solve through its rows
    (:func:`~grace_hooks.locate.linalg.fixed_part`) than to form and factor."""

    site: str
    count: int
    corpus_source: str
    stored: torch.Tensor  # the matrix, or the rows when ``thin``
    thin: bool = False
    cache_path: Path | None = None
    from_cache: bool = False

    @property
    def rows(self) -> torch.Tensor | None:
        return self.stored if self.thin else None

    @property
    def matrix(self) -> torch.Tensor:
        """The (d_in, d_in) matrix, formed from the rows (in float64) when it is kept as rows."""
        if not self.thin:
            return self.stored
        rows = self.stored.to(torch.float64)
        return rows.T @ rows / self.count


def thin_form(max_tokens: int, d_in: int) -> bool:
    """Whether C0 over at most ``max_tokens`` keys of width ``d_in`` is kept as its rows: its rank is at
    most ``max_tokens``, so the rows hold it exactly in no more room than the matrix (on Qwen's 8,960-wide
    MLP input, 1,024 rows are 37 MB against 642 MB)."""
    return max_tokens <= d_in


def _cache_key(model_hash: str, site: Site, corpus: Corpus, max_tokens: int, dtype: torch.dtype) -> str:
    fields = {"model": model_hash, "site": site.name, "corpus": corpus.digest, "max_tokens": max_tokens, "dtype": str(dtype)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]


def second_moment(model, tokenizer, site: Site, corpus: Corpus, max_tokens: int = 100_000,
                  dtype: torch.dtype = torch.float64, batch_size: int = 8, max_length: int = 256,
                  cache: Path | None | bool = True, model_hash: str | None = None) -> SecondMoment:
    """C0 at ``site`` over at most ``max_tokens`` (non-padding) positions of ``corpus``.
    ``cache``: True = the library cache folder, a path = that folder, False/None = no cache."""
    return second_moments(model, tokenizer, [site], corpus, max_tokens, dtype, batch_size, max_length, cache,
                          model_hash)[site.name]


def second_moments(model, tokenizer, sites: list[Site], corpus: Corpus, max_tokens: int = 100_000,
                   dtype: torch.dtype = torch.float64, batch_size: int = 8, max_length: int = 256,
                   cache: Path | None | bool = True, model_hash: str | None = None,
                   also_at: tuple[int, ...] = ()) -> dict[str, SecondMoment]:
    """:func:`second_moment` at several sites: cached ones are read, the others share one pass.
    ``also_at``: smaller token counts whose C0 (over the first that many tokens, as a call with that
    ``max_tokens`` would measure it, up to float32 rounding) is written to the cache on the way (studies of how many tokens
    C0 needs measure them all in one pass). A site where :func:`thin_form` holds keeps its keys, not their products."""
    folder = cache_folder("covariance", cache)
    out: dict[str, SecondMoment] = {}
    paths: dict[str, tuple[str, Path] | None] = {}
    for site in sites:
        paths[site.name] = None
        if folder is None:
            continue
        model_hash = model_hash or model_digest(model)
        key = _cache_key(model_hash, site, corpus, max_tokens, dtype)
        path = paths[site.name] = (key, folder / f"{key}.safetensors")
        if path[1].is_file():
            stored = load_file(str(path[1]))
            meta = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
            log.info("covariance %s: cache hit %s (%d keys, corpus %s)", site.name, path[1].name, meta["count"], meta["corpus_source"])
            thin = "rows" in stored
            out[site.name] = SecondMoment(site.name, int(meta["count"]), meta["corpus_source"],
                                          stored["rows" if thin else "matrix"], thin, path[1], True)
    todo = [s for s in sites if s.name not in out]
    if not todo:
        return out
    thin = {s.name: thin_form(max_tokens, s.dims(model)[0]) for s in todo}
    # float64 by default (``dtype``): C0 sums up to 1e5 outer products, and the solve inverts lambda C0 + K K^T;
    # in the model's bfloat16 or even float32 the sum would lose the small directions the solve relies on
    totals = {s.name: torch.zeros(s.dims(model)[0], s.dims(model)[0], dtype=dtype) for s in todo if not thin[s.name]}
    rows: dict[str, list[torch.Tensor]] = {s.name: [] for s in todo if thin[s.name]}
    count = 0
    device = next(model.parameters()).device
    grabbed: dict[str, torch.Tensor] = {}
    if tokenizer.pad_token_id is None:
        batch_size = 1  # no padding token: one text per forward
    log.info("covariance at %s: measuring up to %d tokens of %s (once per model and corpus, kept in the cache afterwards)",
             [s.name for s in todo], max_tokens, corpus.source)
    bar = Progress(log, min(max_tokens, _token_count(tokenizer, corpus, max_length)), f"C0 at {len(todo)} site(s)", "tokens")
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # left padding would shift positions
    with HookOwner().scoped() as scope, torch.inference_mode():
        for site in todo:
            scope.forward(site.module(model), lambda m, a, o, name=site.name: grabbed.__setitem__(name, a[0].detach()))
        for i in range(0, len(corpus.texts), batch_size):
            if count >= max_tokens:
                break
            enc = tokenizer(list(corpus.texts[i:i + batch_size]), return_tensors="pt", padding=batch_size > 1,
                            truncation=True, max_length=max_length).to(device)
            forward_until(model, deepest(model, todo), **enc)
            real = enc["attention_mask"].bool()
            n = 0
            stops = sorted({c for c in also_at if count < c < max_tokens} | {max_tokens})
            for name, x in grabbed.items():
                # moved in the model's dtype and widened on the CPU: the same numbers, half the copy of float32 ones
                keys = x[real.to(x.device)].cpu().float()[: max_tokens - count]
                n = len(keys)
                if name in rows:  # the keys themselves (float32, as the model gave them): snapshots are their first rows
                    rows[name].append(keys)
                    continue
                # float32 products (a batch is ~10^3 tokens: rounding stays ~1e-6 relative), summed over
                # the batches in ``dtype`` (float64): several times faster than float64 products on a CPU
                start = 0
                for stop in stops:  # the products cut where a snapshot is due: each snapshot has exactly its tokens
                    part = keys[start: max(start, stop - count)]
                    totals[name] += (part.T @ part).to(dtype)
                    start += len(part)
                    if count + start == stop and stop != max_tokens and folder is not None:
                        _store(folder, model_hash, todo, SecondMoment(name, stop, corpus.source, totals[name] / stop),
                               corpus, dtype)
            count += n
            bar.update(n)
    tokenizer.padding_side = side
    seconds = bar.close()
    if count == 0:
        raise ValueError("the corpus gave no tokens to measure")
    kept = {name: torch.cat(r) for name, r in rows.items()}
    if folder is not None:
        for name, r in kept.items():
            for stop in sorted(c for c in also_at if c < count):
                _store(folder, model_hash, todo, SecondMoment(name, stop, corpus.source, r[:stop].clone(), True), corpus, dtype)
    for site in todo:
        where = paths[site.name]
        stored = kept[site.name] if site.name in kept else totals[site.name] / count
        moment = SecondMoment(site.name, count, corpus.source, stored, site.name in kept, where[1] if where else None)
        if where is not None:
            _write_moment(folder, where[0], moment, corpus, dtype)
        out[site.name] = moment
    log.info("covariance at %s: %d keys each from %s in %.0f s", [s.name for s in todo], count, corpus.source, seconds)
    return out


def _store(folder: Path, model_hash: str, sites: list[Site], moment: SecondMoment, corpus: Corpus,
           dtype: torch.dtype) -> None:
    """Write a snapshot (C0 of site ``moment.site`` after ``moment.count`` tokens) as a call with
    ``max_tokens=moment.count`` would."""
    site = next(s for s in sites if s.name == moment.site)
    key = _cache_key(model_hash, site, corpus, moment.count, dtype)
    _write_moment(folder, key, moment, corpus, dtype)
    log.info("covariance %s: snapshot after %d tokens written (%s)", moment.site, moment.count, key)


def _write_moment(folder: Path, key: str, moment: SecondMoment, corpus: Corpus, dtype: torch.dtype) -> None:
    """C0 and its description into the cache folder, the matrix (or rows) last and by rename (a reader never sees half)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({"rows" if moment.thin else "matrix": moment.stored.contiguous()}, str(tmp))
    (folder / f"{key}.json").write_text(json.dumps({"site": moment.site, "count": moment.count,
                                                    "corpus_source": corpus.source, "corpus_digest": corpus.digest,
                                                    "dtype": str(dtype), "form": "rows" if moment.thin else "matrix"}),
                                        encoding="utf-8")
    tmp.replace(path)
