"""GRACE: keys at one site map to trained replacement values of the site's output."""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ...bases.architectures import Site, relative_layer
from ...bases.hooks import head_only_at
from ...engine.router import NO_KEY, exact_assign
from ...engine.runtime import SiteContribution
from ...engine.spans import KeyRouting, request_answer_spans, request_spans
from ...locate.replay import LayerReplay
from ...requests import EditRequest
from ...store.packs import EditPack
from ...store.schema import TensorSpec, named
from ...tokens import EditBatch, build_edit_batch, chat_form_requests, score_targets, scored_positions
from ..base import ComputedEdit, EditContext, EditMethod
from ..registry import register
from .codebook import Codebook
from .config import DEFAULT_RELATIVE_DEPTH, GraceConfig, GraceState, Shrink
from .effect import Replacement

log = logging.getLogger(__name__)


def _scoped_positions(batch: EditBatch, x: torch.Tensor, keys: torch.Tensor, radii: torch.Tensor, last_only: bool):
    """(row, position, entry) of every position that the new keys claim, with inference's rule.
    Site inputs do not depend on the site's own outputs, so this is fixed during training."""
    valid = batch.attention_mask.bool()
    if last_only:  # at inference each generated token is the last position once: prompt end onwards
        pos = torch.arange(valid.shape[1], device=valid.device)[None]
        valid &= pos >= (batch.prompt_len[:, None] - 1)
    rows, cols = valid.nonzero(as_tuple=True)
    # float32 queries against the float32 keys (exact_assign measures the distances in float64), as the router does;
    # the site input may sit on another device than the batch when the model is split over several
    at = x[rows.to(x.device), cols.to(x.device)]
    entry = exact_assign(at.float().cpu(), keys.float().cpu(), radii, torch.zeros(len(keys), dtype=torch.long))
    hit = entry != NO_KEY
    return rows[hit], cols[hit], entry[hit].to(rows.device)


@register
class Grace(EditMethod):
    name = "grace"
    config_class = GraceConfig
    state_class = GraceState
    capabilities = frozenset({"routed", "replace_output", "remove_request"})

    def site(self, model, cfg: GraceConfig) -> Site:
        return Site(cfg.layer if cfg.layer is not None else relative_layer(model, DEFAULT_RELATIVE_DEPTH), cfg.point)

    def compute(self, ctx: EditContext, requests: list[EditRequest], cfg: GraceConfig) -> ComputedEdit:
        site = self.site(ctx.model, cfg)
        n_req = len(requests)
        rows_requests = list(requests) + (chat_form_requests(ctx.tokenizer, requests) if cfg.chat_form else [])
        owner = [i % n_req for i in range(len(rows_requests))]  # row -> the request it keys
        batch = build_edit_batch(ctx.tokens, rows_requests, cfg.key, device=ctx.device)
        if cfg.end_answer:
            batch = batch.with_next_tokens(self._answer_ends(ctx, batch))
        captured = []  # the site's input and output, from the forward that sets up the replay
        with ctx.hooks.scoped() as scope:
            site.hook(scope, ctx.model, lambda x, y: captured.append((x.detach(), y.detach())))
            replay = LayerReplay(ctx.model, site.layer, batch.input_ids, batch.attention_mask)
        x, y = captured[0]
        rows = torch.arange(len(rows_requests), device=x.device)
        queries = x[rows, batch.key_pos.to(x.device)].float()  # float32 keys, whatever the model's dtype

        book = Codebook(cfg.eps_init)
        loaded = ctx.loaded.site(site.name)
        for i, req in enumerate(rows_requests):
            book.add(queries[i].cpu(), req.target_new.strip(), i, loaded)

        keys = torch.stack([e.key for e in book.entries])
        radii = torch.tensor([e.radius for e in book.entries], dtype=torch.float32)  # float32, as the pack stores them
        values, iters, correct = self._train_values(ctx, site, batch, replay, x, y, book, keys, radii, cfg)

        n = site.name
        state = GraceState(labels={n: [e.label for e in book.entries]},
                           shrink=[Shrink(n, p, k, r) for (p, k), r in book.shrinks.items()])
        served = [sorted({owner[r] for r in e.requests}) for e in book.entries]
        routing = KeyRouting(key_requests={n: served})  # each key's requests
        if cfg.scope == "span":  # a key fires once its subject has occurred, until its answer has been written
            routing.subject_spans = request_spans(ctx.tokenizer, requests)
            routing.answer_spans = request_answer_spans(ctx.tokenizer, requests)
        metrics = {
            "teacher_forced_success": float(correct[:n_req].float().mean()),
            **({"chat_form_success": float(correct[n_req:].float().mean())} if len(correct) > n_req else {}),
            "iterations": iters,
            "codebook": {"entries": len(book.entries), "splits": book.splits, "expansions": book.expansions,
                         "updates": book.updates, "shrunk_earlier_keys": len(book.shrinks)},
        }
        log.info("grace: %d requests, %d prompts, %d codebook entries, %d steps, %.0f%% teacher-forced success",
                 n_req, len(rows_requests), len(book.entries), iters, 100 * metrics["teacher_forced_success"])
        tensors = named({n: {"keys": keys.contiguous(), "radii": radii, "values": values.contiguous()}})
        return ComputedEdit(sites=[n], tensors=tensors, state=state, routing=routing, metrics=metrics)

    def without_request(self, pack: EditPack[GraceConfig, GraceState], index: int) -> EditPack:
        """Each key that serves only request ``index`` goes (its radius, value and label with it); the
        others stay as they are, so every input that no removed key claimed is answered as before. The
        shrinks this pack made of earlier keys stay."""
        routing, kept = pack.routing.without_request(index)
        tensors, labels = {}, {}
        for site, keep in kept.items():
            rows = torch.tensor(keep, dtype=torch.long)
            tensors.update(named({site: {part: t.index_select(0, rows).contiguous()
                                         for part, t in pack.site_tensors(site).items()}}))
            labels[site] = [pack.state.labels[site][k] for k in keep] if site in pack.state.labels else None
        state = GraceState(labels={k: v for k, v in labels.items() if v is not None}, shrink=list(pack.state.shrink))
        return self.rebuilt_without(pack, index, tensors, routing, state)

    @staticmethod
    def _answer_ends(ctx: EditContext, batch: EditBatch) -> torch.Tensor:
        """The base model's greedy token after each prompt + answer: what the edit should let come next.
        Without it the value, trained only to write the answer, can pull every later position back
        to the answer's last piece through attention (issue 18)."""
        last = batch.prompt_len + batch.target_len - 1
        rows = torch.arange(len(last), device=last.device)
        with torch.inference_mode(), ctx.disabled(), head_only_at(ctx.model, (rows[:, None], last[:, None])) as narrowed:
            logits = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = logits[:, 0] if narrowed else logits[rows, last]
        return logits.argmax(-1)

    def _train_values(self, ctx, site, batch, full: LayerReplay, x, y, book: Codebook, keys, radii, cfg: GraceConfig):
        gen = torch.Generator().manual_seed(cfg.seed)
        init = []
        for e in book.entries:
            if e.init_value is not None:
                init.append(e.init_value.float())
            elif cfg.value_init == "warm":
                r = e.requests[0]
                init.append(y[r, int(batch.key_pos[r])].float().cpu())
            else:
                init.append(torch.rand(y.shape[-1], generator=gen, dtype=torch.float32))
        # float32: the values and Adam's moments stay float32 when the model is bfloat16 (8 bits would
        # swallow lr-sized steps); each forward casts them to the output's dtype where they replace it
        values = torch.nn.Parameter(torch.stack(init).to(device=ctx.device, dtype=torch.float32))
        rows, cols, entry = _scoped_positions(batch, x, keys, radii, cfg.replacement == "last")
        n_rows = len(batch.prompt_len)
        owners = torch.zeros(len(book.entries), n_rows, dtype=torch.bool)
        for j, e in enumerate(book.entries):
            owners[j, e.requests] = True
        reaches = owners.clone()  # entry j's value can change row r's logits: it owns r or replaces in it
        reaches[entry.cpu(), rows.cpu()] = True
        scoped = (rows, cols, entry)  # of the rows being replayed, numbered within them

        def replace(x, output):
            r, c, e = scoped
            out = output.clone()
            # to the output's dtype and device (a split model may hold this block on another device)
            out[r.to(out.device), c.to(out.device)] = values[e].to(out)
            return out

        # Scores of every row; a row is replayed only while an entry that reaches it still trains
        # (the others' values are frozen, so their last scores stay exact).
        correct, nll = torch.zeros(n_rows, dtype=torch.bool), torch.zeros(n_rows)
        live = torch.ones(n_rows, dtype=torch.bool)
        opt = torch.optim.Adam([values], lr=cfg.lr)
        iters = 0
        with ctx.frozen(), ctx.hooks.scoped() as scope:
            replay, part = full, batch
            index, scored = scored_positions(part)
            site.hook(scope, ctx.model, replace)
            bar = tqdm(range(cfg.n_iter + 1), desc=f"grace: training {len(book.entries)} values", leave=False, disable=None)
            for iters in bar:
                with ctx.attention_mask(part.attention_mask, part.input_ids):  # blocks below the site run once
                    logits = replay.logits(index)
                scores = score_targets(logits, scored)
                correct[live], nll[live] = scores.correct.cpu(), scores.nll.detach().float().cpu()
                done = ~(owners & ~correct[None]).any(dim=1)  # entry done: all its prompts right
                bar.set_postfix(done=f"{int(done.sum())}/{len(done)}", nll=f"{float(nll.mean()):.3f}")
                if bool(done.all()) or iters == cfg.n_iter:
                    break
                (grad,) = torch.autograd.grad(scores.nll.sum(), [values])
                keep = values.detach()[done.to(ctx.device)].clone()
                values.grad = grad
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():  # early stop per entry (GRACE stops once the target is the argmax)
                    values[done.to(ctx.device)] = keep
                still = reaches[~done].any(dim=0)
                if not torch.equal(still, live):  # replay only the rows whose logits can still change
                    live = still
                    idx = live.nonzero().squeeze(1)
                    replay, part = full.select(idx), batch.rows(idx)
                    index, scored = scored_positions(part)
                    number = torch.full((n_rows,), -1, dtype=torch.long)
                    number[idx] = torch.arange(len(idx))
                    kept = live.to(rows.device)[rows]
                    scoped = (number.to(rows.device)[rows[kept]], cols[kept], entry[kept])
            bar.close()
        return values.detach().cpu().float(), iters, correct

    def site_layouts(self, config: GraceConfig) -> list[dict[str, TensorSpec]]:
        return [{"keys": TensorSpec(("n", "d_in")), "radii": TensorSpec(("n",)),
                 "values": TensorSpec(("n", "d_out"))}]

    def check_state(self, pack: EditPack[GraceConfig, GraceState], config: GraceConfig) -> list[str]:
        """Labels (one per key) and radius shrinks at sites of the pack (their types were checked as read)."""
        keys = {site: len(pack.site_tensors(site).get("keys", ())) for site in pack.sites}
        problems = [f"state.labels[{site!r}] must list one string per key of a site of the pack ({keys.get(site, 0)})"
                    for site, names in pack.state.labels.items() if len(names) != keys.get(site, -1)]
        problems += [f"state.shrink entry {s} must give a site of the pack" for s in pack.state.shrink if s.site not in keys]
        return problems + pack.routing.problems(pack.n_edits, keys)

    def contributions(self, pack: EditPack[GraceConfig, GraceState]) -> dict[str, SiteContribution]:
        out = {}
        last_only = pack.config.replacement == "last"
        for site in pack.sites:
            t = pack.site_tensors(site)
            shrink = [(s.pack_id, int(s.key), float(s.radius)) for s in pack.state.shrink if s.site == site]
            out[site] = SiteContribution(
                Replacement(t["values"]), keys=t["keys"], radii=t["radii"],
                labels=pack.state.labels.get(site, []), last_only=last_only, shrink=shrink,
                spans=pack.routing.spans(site), anchor="seen", closers=pack.routing.spans(site, "answer_spans"),
            )
        return out
