"""Random-weight Hugging Face models saved for the benchmarks (`bench generate`, `bench moe`,
`bench quant`), built once per configuration and kept in their directory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def saved_random_model(directory: Path, config, measure) -> object:
    """Save a causal LM with `config` and seed-0 random weights to `directory`, unless it holds
    that configuration already; returns `measure(model)` (recorded with it, e.g. its bytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    marker = directory / "bench-config.json"
    wanted = config.to_json_string()
    if marker.is_file() and json.loads(marker.read_text())["config"] == wanted:
        return json.loads(marker.read_text())["bytes"]
    shutil.rmtree(directory, ignore_errors=True)
    print(f"building and saving the model in {directory} ...", flush=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, max_shard_size="500MB")
    measured = measure(model)
    del model
    marker.write_text(json.dumps({"config": wanted, "bytes": measured}))
    return measured


def parameter_bytes(model, name_part: str = "") -> int:
    """Bytes of the model's parameters (those whose name contains `name_part`)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if name_part in n)
