"""PEFT adapters trained through a tierflow engine, saved without reading the frozen base.

A PEFT model (`peft.get_peft_model(model, LoraConfig(...))`) goes through `tierflow.offload`
like any module: its frozen base keeps only compute-dtype weights in its tiers (no fp32
master, gradient or AdamW moments), the adapters train with `tierflow.AdamW`. The engine's
parameters are placeholders where their unit is not resident, so `peft_model.save_pretrained`
would write placeholders; `save_adapters` hands PEFT the adapters' current values instead,
reading only the tensors PEFT saves (never the whole base):

    from tierflow.integrations.peft import save_adapters
    save_adapters(engine, "out/adapter")          # then PeftModel.from_pretrained(base, "out/adapter")
"""
from __future__ import annotations

import torch


def adapter_state_dict(engine, adapter_names=None, save_embedding_layers="auto") -> dict:
    """The tensors `peft_model.save_pretrained` saves for `adapter_names` (default: every
    adapter), as full tensors in the model's dtype under `model.state_dict()` keys, current
    (recorded optimizer steps applied). Only those tensors are read from the tiers."""
    from peft import get_peft_model_state_dict  # PEFT is needed only when saving adapters

    model = engine.module
    names = list(adapter_names) if adapter_names is not None else list(model.peft_config)
    engine.flush()
    live = model.state_dict(keep_vars=True)  # the parameters themselves: nothing is read here
    wanted = {}
    for name in names:
        chosen = get_peft_model_state_dict(model, state_dict=live, adapter_name=name,
                                           save_embedding_layers=save_embedding_layers)
        wanted.update({id(value): value for value in chosen.values() if isinstance(value, torch.Tensor)})
    slots = {id(slot.param): (unit, slot) for unit, slot in engine.named_slots()}
    result = {}
    for key, value in live.items():
        if id(value) not in wanted:
            continue
        if id(value) in slots:
            result[key] = engine.read_array(*slots[id(value)]).to(engine.param_dtype)
        else:  # a buffer, or a parameter the engine does not hold
            result[key] = value.detach().clone()
    return result


def save_adapters(engine, out_dir, selected_adapters=None, save_embedding_layers="auto", **kwargs) -> None:
    """`engine.module.save_pretrained(out_dir, ...)` (a PeftModel) with the adapters' values
    from the engine's tiers; reload with `peft.PeftModel.from_pretrained(base_model, out_dir)`.
    Extra keyword arguments go to PEFT's `save_pretrained`."""
    model = engine.module
    if not hasattr(model, "peft_config"):
        from tierflow.errors import ConfigError
        raise ConfigError(f"save_adapters needs an engine over a PEFT model, got {type(model).__name__}")
    state = adapter_state_dict(engine, selected_adapters, save_embedding_layers)
    model.save_pretrained(out_dir, state_dict=state, selected_adapters=selected_adapters,
                          save_embedding_layers=save_embedding_layers, **kwargs)
