"""Exporting a pack as a standard PEFT LoRA adapter (PEFT, vLLM and LoRAX serve these), where its
effect at every site has a LoRA form (``Effect.lora``, :mod:`grace_hooks.engine.effects`).

A global-mode delta dW = U V^T at a site is exactly a LoRA pair with A = V^T (r x d_in),
B = U (d_out x r) and scaling lora_alpha / r = 1; GPT-2's Conv1D sites set ``fan_in_fan_out``
(PEFT's forward is the same either way; the flag matters when PEFT merges). Routed deltas act only
where the router fires, which LoRA cannot express, so they are refused, as are effects that are no
weight update (GRACE's replacements).
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ..bases.architectures import ARCHITECTURES, Site
from ..bases.loading import hf_reference
from ..engine.effects import NoLoraForm
from ..errors import PackError
from ..methods import get_method
from ..store.adapters_dir import write_new_dir
from ..store.packs import EditPack


def export_peft(pack: EditPack, dest: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``pack`` into ``dest`` (new)."""
    from peft import LoraConfig

    impl = get_method(pack.method)
    spec = ARCHITECTURES.get(pack.base.model_type)
    if spec is None:
        raise PackError(f"pack {pack.name!r} was made for architecture {pack.base.model_type!r}, which has no module table")
    tensors, ranks, transposed = {}, {}, set()
    for name, c in impl.contributions(pack).items():
        site = Site.parse(name)
        path = site.path(spec)
        if site.point in spec.written_at:
            raise PackError(f"pack {pack.name!r} has no LoRA form: on {pack.base.model_type!r} its effect at {name} is "
                            f"added after {spec.written_at[site.point]!r}, not to the weight of {path!r}; serve it "
                            "with grace_hooks instead")
        try:
            A, B = c.effect.lora()
        except NoLoraForm as exc:
            raise PackError(f"pack {pack.name!r} (method {pack.method!r}) has no LoRA form: {exc}") from None
        tensors[f"base_model.model.{path}.lora_A.weight"] = A
        tensors[f"base_model.model.{path}.lora_B.weight"] = B
        ranks[path] = int(B.shape[1])
        transposed.add(site.point in spec.transposed)
    if not tensors:
        raise PackError(f"pack {pack.name!r} holds no weight delta to export")
    if len(transposed) > 1:
        raise PackError(f"pack {pack.name!r} mixes transposed and plain sites; export them separately")
    r = max(ranks.values())
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(ranks), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        rank_pattern=dict(ranks), alpha_pattern=dict(ranks),  # alpha = r per module: scaling 1, dW = B A exactly
        # A reference PEFT can load: an embedded short name ('smollm2-135m') means nothing outside this library.
        fan_in_fan_out=transposed.pop(), base_model_name_or_path=hf_reference(pack.base.name), inference_mode=True,
    )
    def fill(tmp: Path) -> None:
        tmp.mkdir()
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt", "grace_hooks_pack": pack.name})

    return write_new_dir(Path(dest), fill)
