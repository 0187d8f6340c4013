"""The lifelong-editing benchmark: a stream of records edited in batches, measured at checkpoints.

At each checkpoint (after ``m`` edits):
- ES on every edit made so far, and ERR: the share of edits that succeeded right after they were
  made that still succeed now;
- every other metric on the records of a fixed, evenly spaced sample of the stream that are
  edited by then (``eval_sample`` records at most; the last checkpoint uses every edited record);
- answers to the natural stop on ``chat_sample`` records of the sample (:mod:`.asking`): the records'
  own prompts (``chat_*``) and the questions a user would ask (``question_*``, ``subject_kept``),
  through the tokenizer's chat template where it has one (``question_form``: "chat" or "plain");
- base health on a fixed unrelated text, generation tokens/s against the base, costs.
Every base figure is measured in the same process on the same batches with the edits disabled
(once per batch: the base does not change). State is saved at each checkpoint; a rerun with the
same settings continues from the last one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import option
from ..engine.health import reference_texts
from ..errors import ConfigError
from ..model import EditableModel
from ..requests import EditRequest
from ..version import __version__
from .asking import Asker, chat_metrics, question_metrics
from .chat import CHAT_MAX_NEW_TOKENS, question_form
from .editors import Editor, MethodSpec, make_editor
from .generation import timed_generation
from .metrics import (PairScores, concat_scores, counterfact_metrics, generation_success, names_edited_subject, retention,
                      score_records, score_texts, take_scores, unrelated_locality)
from .runinfo import dir_bytes, median, p90, peak_rss_mib

log = logging.getLogger(__name__)
STATE_VERSION = 1
PARAPHRASE_EXTRA_TOKENS = 10  # greedy tokens past the target's length in which a paraphrase may mention it


@dataclass
class LifelongConfig:
    n_records: int = option(1000, "records in the stream (the first ones of the data file after --offset)")
    offset: int = option(0, "records skipped at the start of the data file")
    batch: int = option(1, "records per edit call (one pack per call)")
    checkpoint_every: int = option(0, "edits between checkpoints; 0 = ten evenly spaced checkpoints")
    eval_sample: int = option(200, "records re-measured at intermediate checkpoints (0 = all; ES/ERR always use all)")
    final_sample: bool = option(False, "measure the last checkpoint on the sample too (faster) instead of every edited record")
    eval_batch: int = option(16, "records per evaluation forward")
    gen_tokens: int = option(16, "tokens per timed generation")
    gen_rounds: int = option(2, "alternating edited/base rounds of the generation timing")
    chat_sample: int = option(100, "records of the sample also asked as questions and as their own prompts, in chat "
                                   "form where the tokenizer has a chat template, answered to the natural stop (0 = none)")
    answer_tokens: int = option(CHAT_MAX_NEW_TOKENS, "greedy tokens at most in each of those answers (most stop "
                                                     "earlier, at their natural end)")
    cloze_answers: bool = option(True, "with chat_sample: also answer the records' own prompts (cloze, paraphrase, "
                                       "locality) to the natural stop, the chat_* columns of earlier runs "
                                       "(--no-cloze-answers halves the answered-text time)")
    checkpoints: str = option("", "comma-separated edit counts to measure at (e.g. '1000,2000,5000,10000'); overrides checkpoint_every")


def unrelated_texts() -> list[str]:
    """Paragraphs on topics far from any CounterFact / zsRE fact (perplexity, bit-identity)."""
    return reference_texts()


def checkpoint_counts(n: int, batch: int, every: int = 0, listed: str = "") -> list[int]:
    """Edit counts after which to measure: multiples of ``batch``, always ending at ``n``; ``listed``:
    the counts themselves, comma-separated."""
    if n < 1 or batch < 1:
        raise ConfigError(f"n_records and batch must be >= 1 (got {n}, {batch})")
    if listed:
        try:
            counts = sorted({int(x) for x in listed.split(",") if x.strip()})
        except ValueError:
            raise ConfigError(f"checkpoints must be comma-separated edit counts, got {listed!r}") from None
        bad = [c for c in counts if c < 1 or c > n or c % batch]
        if bad:
            raise ConfigError(f"checkpoints {bad} are not multiples of the batch ({batch}) between {batch} and {n}")
        return sorted(set(counts) | {n})
    step = every if every > 0 else math.ceil(n / 10)
    step = max(batch, math.ceil(step / batch) * batch)
    return sorted({min(n, k) for k in range(step, n + step, step)})


def signature_differences(stored: dict, now: dict, path: str = "") -> list[str]:
    """What differs between a stored run signature and this one, as 'key: stored -> now' lines
    (nested keys dotted, e.g. 'method_config.lr: 0.5 -> 1.0'; 'not recorded' where one side lacks it)."""
    out = []
    for key in sorted(set(stored) | set(now)):
        a, b = stored.get(key, "not recorded"), now.get(key, "not recorded")
        if isinstance(a, dict) and isinstance(b, dict):
            out += signature_differences(a, b, f"{path}{key}.")
        elif a != b:
            out.append(f"{path}{key}: {a!r} -> {b!r}")
    return out


class BaseReference:
    """Base-model scores, measured once per batch of records and reused (the base never changes)."""

    def __init__(self) -> None:
        self.scores: dict[tuple, dict[str, PairScores]] = {}
        self.generation: dict[tuple, list[bool]] = {}
        self.chat: dict[tuple, list[str]] = {}  # (what was asked, records) -> the base's answers (asking.Asker)
        self.text = None


class LifelongRun:
    """One method spec on one stream, in ``workdir``."""

    def __init__(self, model: EditableModel, requests: list[EditRequest], spec: MethodSpec, cfg: LifelongConfig,
                 workdir: Path, base: BaseReference | None = None, meta: dict | None = None) -> None:
        if len(requests) < cfg.n_records:
            raise ConfigError(f"the data has {len(requests)} records after the offset; n_records={cfg.n_records}")
        self.model, self.spec, self.cfg, self.workdir = model, spec, cfg, Path(workdir)
        self.requests = requests[: cfg.n_records]
        self.base = base or BaseReference()
        self.meta = meta or {}
        self.stride = max(1, math.ceil(cfg.n_records / cfg.eval_sample)) if cfg.eval_sample else 1
        self.counts = checkpoint_counts(cfg.n_records, cfg.batch, cfg.checkpoint_every, cfg.checkpoints)
        git = self.meta.get("git") or {}
        # what a resumed run must share with the run it continues: the resolved method config is
        # added once the editor exists (run()), so two defaults are never mixed without saying so
        self.signature = {"spec": spec.label, "config": asdict(cfg), **{k: self.meta.get(k) for k in ("model", "data_sha256")},
                          "code": {k: git.get(k) for k in ("commit", "diff_sha256")} if git else None}

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.workdir / "state.json"

    def _load_state(self) -> dict:
        if not self.state_path.is_file():
            return {"version": STATE_VERSION, "signature": self.signature, "edits": 0, "batch_seconds": [],
                    "immediate_es": [], "checkpoints": []}
        state = json.loads(self.state_path.read_text(encoding="utf-8"))
        stored = state.get("signature") or {}
        if "config" in stored:  # settings added since that run started: it ran with their defaults
            stored["config"] = {**asdict(LifelongConfig()), **stored["config"]}
        differs = signature_differences(stored, self.signature)
        if differs:
            raise ConfigError(f"{self.workdir} holds a run with other settings: {'; '.join(differs)}. Resume it with "
                              "the same code and settings, or choose another output folder (or delete this one)")
        return state

    def _save_state(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        tmp.replace(self.state_path)

    # ------------------------------------------------------------------ the run
    def run(self, progress: bool = True) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        editor = make_editor(self.model, self.spec)
        try:
            self.signature["method_config"] = json.loads(json.dumps(editor.config(), default=str))  # as stored: JSON types
            state = self._load_state()
            done = state["edits"]
            editor.restore(self.workdir, done // self.cfg.batch)
            if done:
                log.info("%s: resuming after %d edits", self.spec.label, done)
            bar = tqdm(total=self.cfg.n_records, initial=done, desc=self.spec.label, unit="edit", disable=not progress,
                       mininterval=2.0)
            while done < self.cfg.n_records:
                stop = min(self.cfg.n_records, done + self.cfg.batch)
                self._edit_batch(editor, state, done, stop)
                done = state["edits"] = stop
                bar.update(stop - bar.n)
                es = [x for x in state["immediate_es"] if x is not None]
                bar.set_postfix(ES=f"{np.mean(es):.3f}" if es else "-", refresh=False)
                if done in self.counts:
                    state["checkpoints"].append(self._checkpoint(editor, state, done))
                    ck = state["checkpoints"][-1]
                    log.info("%s @ %d edits: ES %.3f ERR %s NS %s", self.spec.label, done, ck["ES"] or 0, ck.get("ERR"), ck.get("NS"))
                editor.snapshot(self.workdir)  # every batch: a stopped run resumes after its last finished batch
                self._save_state(state)
            bar.close()
            return self._summary(editor, state)
        finally:
            editor.close()

    def _edit_batch(self, editor: Editor, state: dict, start: int, stop: int) -> None:
        reqs = self.requests[start:stop]
        t0 = time.perf_counter()
        editor.edit(reqs, start // self.cfg.batch)
        state["batch_seconds"].append([stop - start, time.perf_counter() - t0])
        editor.save(self.workdir, start // self.cfg.batch)
        scores = score_records(self.model, reqs, ("prompt",), self.cfg.eval_batch)
        new, true = scores["prompt/new"].logprob, scores["prompt/true"].logprob
        state["immediate_es"] += [None if (math.isnan(a) or math.isnan(b)) else float(a > b) for a, b in zip(new, true)]

    # ------------------------------------------------------------------ measuring
    def _scores(self, editor: Editor, idx: list[int], parts: tuple[str, ...], routes: bool):
        edited, base = [], []
        for s in range(0, len(idx), self.cfg.eval_batch):
            chunk = idx[s:s + self.cfg.eval_batch]
            reqs = [self.requests[i] for i in chunk]
            edited.append(score_records(self.model, reqs, parts, len(chunk), routes))
            key = (parts, tuple(chunk))
            if key not in self.base.scores:
                with editor.disabled():
                    self.base.scores[key] = score_records(self.model, reqs, parts, len(chunk))
            base.append(self.base.scores[key])
        return concat_scores(edited), concat_scores(base)

    def _generation(self, editor: Editor, idx: list[int], part: str = "prompt", extra_tokens: int = 0):
        """Greedy generation success on each record's prompt (or its paraphrase), edited and base;
        with ``extra_tokens``, each is a (starts with the target, mentions it) pair of lists."""
        edited, base = [], []
        for s in range(0, len(idx), self.cfg.eval_batch):
            chunk = tuple(idx[s:s + self.cfg.eval_batch])
            reqs = [self.requests[i] for i in chunk]
            edited.append(generation_success(self.model, reqs, len(chunk), part, extra_tokens))
            if (part, chunk) not in self.base.generation:
                with editor.disabled():
                    self.base.generation[part, chunk] = generation_success(self.model, reqs, len(chunk), part, extra_tokens)
            base.append(self.base.generation[part, chunk])
        if extra_tokens:
            return tuple([sum((c[i] for c in runs), []) for i in (0, 1)] for runs in (edited, base))
        return sum(edited, []), sum(base, [])

    def _checkpoint(self, editor: Editor, state: dict, m: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        every = list(range(m))
        # ES on every edit so far; ERR over those that worked right after their edit
        edited, base = self._scores(editor, every, ("prompt",), False)
        ck: dict[str, Any] = {"edits": m}
        ck.update({k: v for k, v in counterfact_metrics(edited, base).items() if k.startswith("ES")})
        now = np.greater(edited["prompt/new"].logprob, edited["prompt/true"].logprob)
        ck["ES_right_after_edit"] = float(np.mean([x for x in state["immediate_es"][:m] if x is not None]))
        ck["ERR"] = retention(now, state["immediate_es"][:m])
        # everything else on the sample
        last = m == self.cfg.n_records and not self.cfg.final_sample
        sample = every if (last or self.stride == 1) else [i for i in every if i % self.stride == 0]
        ck["sample_size"] = len(sample)
        s_edited, s_base = self._scores(editor, sample, ("rephrase", "locality"), editor.routed)
        s_edited.update(take_scores(edited, sample))
        s_base.update(take_scores(base, sample))
        serves = [editor.serves(i // self.cfg.batch, i % self.cfg.batch) for i in sample] if editor.routed else None
        ck.update({k: v for k, v in counterfact_metrics(s_edited, s_base, serves).items() if not k.startswith("ES")})
        subjects = {self.requests[i].subject for i in every}
        unrelated = {i for i in sample if not names_edited_subject(self.requests[i].locality_prompt, self.requests[i].subject, subjects)}
        if "locality/true" in s_edited:
            ck.update(unrelated_locality(s_edited, s_base, [i in unrelated for i in sample]))
        gen, gen_base = self._generation(editor, sample)
        ck["generation_success"], ck["generation_success_base"] = float(np.mean(gen)), float(np.mean(gen_base))
        if all(self.requests[i].rephrase_prompt for i in sample):  # greedy on the paraphrase: starts with / mentions the target
            (starts, said), (starts_base, said_base) = self._generation(editor, sample, "rephrase", PARAPHRASE_EXTRA_TOKENS)
            ck["generation_success_rephrase"], ck["generation_success_rephrase_base"] = float(np.mean(starts)), float(np.mean(starts_base))
            ck["generation_mentions_rephrase"], ck["generation_mentions_rephrase_base"] = float(np.mean(said)), float(np.mean(said_base))
        if self.cfg.chat_sample:  # answered to the natural stop, as a user reads them (grace_hooks.eval.asking)
            asked = sample[::max(1, math.ceil(len(sample) / self.cfg.chat_sample))]
            ask = Asker(self.model, editor, self.base.chat, self.cfg.eval_batch, self.cfg.answer_tokens)
            ck["question_form"] = question_form(self.model.tokenizer)
            if self.cfg.cloze_answers:
                ck.update(chat_metrics(ask, self.requests, asked, unrelated))
            ck.update(question_metrics(ask, self.requests, asked, unrelated))
        ck.update(self._health(editor))
        ck.update(self._speed(editor, m))
        ck.update(self._costs(editor, state, m))
        ck["eval_seconds"] = time.perf_counter() - t0
        return ck

    def _health(self, editor: Editor) -> dict[str, Any]:
        texts = unrelated_texts()
        edited = score_texts(self.model, texts, routes=editor.routed)
        if self.base.text is None:
            with editor.disabled():
                self.base.text = score_texts(self.model, texts)
        out = {"perplexity": edited.perplexity, "perplexity_base": self.base.text.perplexity,
               "perplexity_ratio": edited.perplexity / self.base.text.perplexity,
               "bit_identical_text": float(np.mean([a == b for a, b in zip(edited.digest, self.base.text.digest)]))}
        if edited.hits is not None:
            out["false_fire_text"] = float(np.mean([bool(h) for h in edited.hits]))
        out.update(editor.health(texts))
        return out

    def _speed(self, editor: Editor, m: int) -> dict[str, Any]:
        """Greedy tokens/s with the edits loaded against the base, alternating rounds."""
        prompts = [t.split(".")[0] for t in unrelated_texts()[:2]] + [self.requests[0].text]
        n = self.cfg.gen_tokens
        timed_generation(self.model, prompts[0], 2)  # warm-up
        secs: dict[str, list[float]] = {"edited": [], "base": []}
        for r in range(self.cfg.gen_rounds):
            for mode in (("edited", "base") if r % 2 == 0 else ("base", "edited")):
                ctx = editor.disabled() if mode == "base" else contextlib.nullcontext()
                with ctx:
                    secs[mode].append(sum(timed_generation(self.model, p, n)[0] for p in prompts))
        ratios = [e / b for e, b in zip(secs["edited"], secs["base"])]
        tokens = n * len(prompts)
        return {"tokens_per_s": tokens / median(secs["edited"]), "tokens_per_s_base": tokens / median(secs["base"]),
                "time_ratio_to_base": median(ratios)}

    def _costs(self, editor: Editor, state: dict, m: int) -> dict[str, Any]:
        per_edit = [s / n for n, s in state["batch_seconds"]]
        disk = dir_bytes(self.workdir / "adapters")["total"]
        ft_file = self.workdir / "ft_weight.safetensors"
        disk += ft_file.stat().st_size if ft_file.is_file() else 0
        return {"seconds_per_edit_median": median(per_edit), "seconds_per_edit_p90": p90(per_edit),
                "seconds_per_edit_mean": sum(s for _, s in state["batch_seconds"]) / m,
                "peak_rss_mib": peak_rss_mib(), "bytes_per_edit_disk": disk / m,
                "bytes_per_edit_memory": editor.bytes_in_memory() / m}

    def _summary(self, editor: Editor, state: dict) -> dict[str, Any]:
        result = {"spec": self.spec.label, "method": self.spec.method, "method_config": editor.config(),
                  "harness_config": asdict(self.cfg), "checkpoints": state["checkpoints"],
                  "sample_stride": self.stride, "library_version": __version__, "code": self.signature["code"],
                  **{k: v for k, v in self.meta.items() if k != "git"}}
        if self.cfg.n_records in self.counts:
            result["adapters_load_seconds"] = editor.load_seconds(self.workdir)
        (self.workdir / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        return result

