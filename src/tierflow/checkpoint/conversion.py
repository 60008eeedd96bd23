"""Which checkpoint tensors make each model parameter, by transformers' own conversion rules.

A checkpoint does not always hold a model's parameters under their names: transformers 5 keeps a
mixture of experts' weights fused (`mlp.experts.gate_up_proj`, [experts, 2 x intermediate,
hidden]) while checkpoints hold one tensor per expert and projection
(`block_sparse_moe.experts.3.w1.weight`), and some models renamed modules. transformers
describes these conversions per model type (`conversion_mapping.get_model_conversion_mapping`:
renamings, and converters such as `MergeModulelist` + `Concatenate`); `from_pretrained` applies
them to the whole state dict at once. Here the same rules are applied one parameter at a time:
each parameter gets a `Reading` that reads only its own source tensors and runs the
converter's operations on them, so loading holds one fused parameter (and its pieces) at a
time, never the model. Without these rules (older transformers) a parameter is found under its
own name, with or without the base model's prefix.
"""
from __future__ import annotations

import copy
import functools
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Reading:
    """How one parameter is read: a tensor of one file, or several tensors and a converter."""

    target: str
    sources: dict = field(default_factory=dict)   # source pattern -> [(reader, key)] in checkpoint order
    converter: object = None                     # a transformers WeightConverter, or None (one tensor)
    model: nn.Module | None = None

    @property
    def first(self) -> tuple:
        """(reader, key) of the first source tensor (to name it in errors)."""
        return next(iter(self.sources.values()))[0]

    def read(self) -> torch.Tensor:
        """The parameter's value as a new CPU tensor."""
        return self._run(lambda reader, key: functools.partial(reader.read, key))

    def shape(self) -> tuple:
        """The parameter's shape, from the files' headers only (the operations run on meta tensors)."""
        return tuple(self._run(lambda reader, key: functools.partial(
            torch.empty, reader.shape(key), dtype=reader.dtype(key), device="meta")).shape)

    def dtypes(self) -> set:
        return {reader.dtype(key) for items in self.sources.values() for reader, key in items}

    def _run(self, loader) -> torch.Tensor:
        if self.converter is None:
            return loader(*self.first)()
        converter = copy.deepcopy(self.converter)
        for pattern, items in self.sources.items():
            for reader, key in items:  # callables: transformers' synchronous loading path
                converter.collected_tensors[pattern].append(loader(reader, key))
        out = converter.convert(self.target, model=self.model, config=getattr(self.model, "config", None))
        return out[self.target] if self.target in out else next(iter(out.values()))


def readings(model: nn.Module, readers: list) -> dict[str, Reading]:
    """Model state name -> its Reading, for every name some checkpoint tensor maps to."""
    available = {key: reader for reader in readers for key in reader.keys()}
    rules = _rules(model)
    if rules is None:
        return _by_name(model, available)
    renamings, converters, rename, natural_key = rules
    meta = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    by_pattern = {pattern: conv for conv in converters for pattern in conv.source_patterns}
    found: dict[str, Reading] = {}
    for key in sorted(available, key=natural_key):
        target, pattern = rename(key, renamings, converters, prefix or None, meta)
        if target not in meta and key in meta:  # as from_pretrained: the key as it is, prefix adjusted
            target, pattern = rename(key, [], [], prefix or None, meta)
        if target not in meta:
            continue
        if pattern is None:
            found.setdefault(target, Reading(target, {key: [(available[key], key)]}))
            continue
        reading = found.setdefault(target, Reading(target, defaultdict(list), by_pattern[pattern], model))
        reading.sources[pattern].append((available[key], key))
    for name, reading in _by_name(model, available).items():  # keys no rule touched, prefix variants
        found.setdefault(name, reading)
    return found


def _by_name(model: nn.Module, available: dict) -> dict[str, Reading]:
    """Names found as they are, or with the base model's prefix removed or added."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    found = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        candidates = [name] + ([name.removeprefix(prefix + "."), f"{prefix}.{name}"] if prefix else [])
        key = next((k for k in candidates if k in available), None)
        if key is not None:
            found[name] = Reading(name, {key: [(available[key], key)]})
    return found


def _rules(model: nn.Module):
    """transformers' conversion rules for `model` (renamings, converters, the key renamer and
    its sort order), or None where this transformers has none (before 5.0) or the model is
    not a transformers model."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                     rename_source_key)
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    return renamings, converters, rename_source_key, dot_natural_key
