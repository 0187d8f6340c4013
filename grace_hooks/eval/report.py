"""Tables and plots of lifelong-benchmark results (``results.json`` -> markdown and PNG)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

# Answers to the natural stop (grace_hooks.eval.asking) go through the tokenizer's chat template where it
# has one and are plain greedy continuations otherwise; "{form}" in a label says which (the checkpoints'
# question_form), so that a figure is called "chat" only where a chat template was applied.
FORM_WORDS = {"chat": "chat", "plain": "plain prompt"}
UNKNOWN_FORM = "chat or plain prompt"  # results written before question_form was recorded, or a mix

# column label, checkpoint key, format ("%" share, "x" ratio, "s" seconds, "n" number)
COLUMN_SPECS: list[tuple[str, str, str]] = [
    ("ES", "ES", "%"), ("PS", "PS", "%"), ("NS", "NS", "%"), ("NS base", "NS_base", "%"),
    ("gen. success", "generation_success", "%"), ("gen. success (paraphrase)", "generation_success_rephrase", "%"),
    ("gen. mentions (paraphrase)", "generation_mentions_rephrase", "%"),
    ("{form} success", "chat_success", "%"), ("{form} success (paraphrase)", "chat_success_rephrase", "%"),
    ("{form} answers unchanged", "chat_locality", "%"),
    ("question success ({form})", "question_success", "%"), ("question success, base ({form})", "question_success_base", "%"),
    ("question success, other wording ({form})", "question_success_rephrase", "%"),
    ("question answers unchanged ({form})", "question_locality", "%"), ("subject kept ({form})", "subject_kept", "%"),
    ("ERR", "ERR", "%"),
    ("reliability", "reliability", "%"), ("generality", "generality", "%"), ("locality", "locality", "%"),
    ("ppl ratio", "perplexity_ratio", "x"), ("bit-identical", "bit_identical", "%"),
    ("bit-identical (unrelated)", "bit_identical_unrelated", "%"),
    ("W norm growth", "weight_norm_ratio_max", "x"), ("act. drift", "activation_drift_max", "x"),
    ("recall", "router_recall", "%"), ("false fire", "false_fire", "%"), ("false fire (unrelated)", "false_fire_unrelated", "%"),
    ("s/edit (median)", "seconds_per_edit_median", "s"), ("s/edit (p90)", "seconds_per_edit_p90", "s"),
    ("tok/s ratio", "time_ratio_to_base", "inv"), ("bytes/edit disk", "bytes_per_edit_disk", "n"),
]
# The labels for tables that gather runs of unknown or mixed forms (benchmarks/summarize_lifelong.py).
COLUMNS = [(label.format(form=UNKNOWN_FORM), key, kind) for label, key, kind in COLUMN_SPECS]
PLOTTED = [("ES", "ES"), ("PS", "PS"), ("NS", "NS"), ("generation success", "generation_success"),
           ("{form} success (the edit's prompt, natural stop)", "chat_success"),
           ("{form} success (paraphrase)", "chat_success_rephrase"),
           ("{form} answers unchanged (locality prompts)", "chat_locality"),
           ("question success ({form}, natural stop)", "question_success"),
           ("question success, other wording ({form})", "question_success_rephrase"),
           ("question answers unchanged ({form}, locality subjects)", "question_locality"),
           ("subject kept in the answer ({form})", "subject_kept"),
           ("ERR", "ERR"), ("bit-identical (locality prompts)", "bit_identical"), ("perplexity ratio", "perplexity_ratio"),
           ("|W0 + sum dW| / |W0| (largest site)", "weight_norm_ratio_max")]


def fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "%":
        return f"{100 * value:.1f}"
    if kind == "x":
        return f"{value:.3f}"
    if kind == "inv":  # edited/base time -> edited/base tokens per second
        return f"{1 / value:.2f}"
    if kind == "s":
        return f"{value:.2f}"
    return f"{value:,.0f}"


def asked_form(checkpoints: Sequence[dict[str, Any]]) -> str | None:
    """How the answered figures of these checkpoints were asked: "chat", "plain", or None (not recorded, or mixed)."""
    forms = {c.get("question_form") for c in checkpoints if c.get("chat_sample_size") is not None}
    return forms.pop() if len(forms) == 1 else None


def form_word(checkpoints: Sequence[dict[str, Any]]) -> str:
    """:func:`asked_form` in the words labels use."""
    return FORM_WORDS.get(asked_form(checkpoints), UNKNOWN_FORM)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMN_SPECS,
          label_key: str = "row") -> str:
    """One markdown row per dict (the final checkpoint's metrics plus a ``row`` label); "{form}" in a
    label becomes how the rows' answered figures were asked."""
    form = form_word(rows)
    head = "| " + " | ".join([label_key] + [c[0].format(form=form) for c in columns]) + " |"
    sep = "|" + "---|" + "---:|" * len(columns)
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join([str(r[label_key])] + [fmt(r.get(key), kind) for _, key, kind in columns]) + " |")
    return "\n".join(lines)


def final_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, res in results["runs"].items():
        if res.get("checkpoints"):
            rows.append({"row": f"{label} (batch {res['harness_config']['batch']})", **res["checkpoints"][-1]})
    return rows


def checkpoint_table(res: dict[str, Any]) -> str:
    cols = [c for c in COLUMN_SPECS if c[1] in ("ES", "PS", "NS", "generation_success", "generation_success_rephrase",
                                           "generation_mentions_rephrase", "chat_success", "chat_success_rephrase",
                                           "chat_locality", "question_success", "question_success_base",
                                           "question_success_rephrase", "question_locality", "subject_kept",
                                           "ERR", "bit_identical",
                                           "perplexity_ratio", "weight_norm_ratio_max", "seconds_per_edit_median",
                                           "time_ratio_to_base")]
    cols.append(("sample", "sample_size", "n"))
    return table([{"edits": ck["edits"], **ck} for ck in res["checkpoints"]], cols, label_key="edits")


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [f"# Lifelong editing: {meta['model']} on {Path(meta['data']).name}", "",
             f"Command: `{meta['command']}`", "",
             f"{meta['n_records']} records, batch {meta['batch']}; library {meta['library_version']}, "
             f"commit {meta.get('git', {}).get('commit') or 'unknown'}; {meta['machine']['threads_used']} thread(s) on "
             f"{meta['machine']['cores_available']} cores. Percentages except the ratios; ES and ERR over every edit, "
             f"the other metrics over the sample stated per checkpoint (every edit at the last one).", "",
             asked_note(results), "",
             "## At the last checkpoint", "", table(final_rows(results)), ""]
    for label, res in results["runs"].items():
        parts += [f"## {label}: every checkpoint", "", checkpoint_table(res), ""]
    return "\n".join(parts)


def asked_note(results: dict[str, Any]) -> str:
    """One sentence on how the answered figures were asked (what "chat" or "plain prompt" means here)."""
    checkpoints = [c for res in results["runs"].values() for c in res.get("checkpoints", [])]
    how = {"chat": "through the tokenizer's chat template, as one user turn",
           "plain": "as plain text (the tokenizer has no chat template), greedily continued"}.get(
        asked_form(checkpoints), "in a form these results do not record")
    return (f"Answered figures ({form_word(checkpoints)}): questions and prompts asked {how}, answered greedily to "
            "the natural stop; success = the new target as whole words in the answer.")


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """metrics.png (each metric vs edits), seconds_per_edit.png, tokens_per_s.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in results["runs"].items() if v.get("checkpoints")}
    form = form_word([c for res in runs.values() for c in res["checkpoints"]])
    paths = []
    n_rows = math.ceil((len(PLOTTED) + 1) / 4)  # one more panel for the legend
    fig, axes = plt.subplots(n_rows, 4, figsize=(20, 3.4 * n_rows))
    for ax in axes.flat[len(PLOTTED):-1]:
        ax.axis("off")
    for ax, (title, key) in zip(axes.flat, PLOTTED):
        for label, res in runs.items():
            cks = [c for c in res["checkpoints"] if c.get(key) is not None]
            ax.plot([c["edits"] for c in cks], [c[key] for c in cks], marker="o", ms=3, label=label)
        ax.set_title(title.format(form=form))
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center")
    fig.tight_layout()
    paths.append(out / "metrics.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    for name, key, ylabel in (("seconds_per_edit", "seconds_per_edit_median", "seconds per edit (median so far)"),
                              ("tokens_per_s", "tokens_per_s", "generation tokens/s (edits loaded)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, res in runs.items():
            cks = res["checkpoints"]
            ax.plot([c["edits"] for c in cks], [c[key] for c in cks], marker="o", ms=3, label=label)
            if key == "tokens_per_s":
                ax.plot([c["edits"] for c in cks], [c["tokens_per_s_base"] for c in cks], ls="--", lw=1,
                        label=f"{label}: base, same run")
        ax.set_xlabel("edits")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths
