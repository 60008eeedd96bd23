"""Smoke check of the activation modes on CUDA (run by hand on a GPU machine):
PYTHONPATH=src python tests/cuda_activations_smoke.py"""
import sys
import warnings

import torch
import transformers

import tierflow

warnings.simplefilter("ignore")


def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   use_cache=False)
    return transformers.AutoModelForCausalLM.from_config(cfg)


ids = torch.randint(0, 96, (1, 512), generator=torch.Generator().manual_seed(1)).cuda()
ref = model().cuda()
opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
ref_losses = []
for _ in range(3):
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(); ref_losses.append(loss.item())
ok = True
for mode in ("keep", "recompute", "offload", "auto"):
    engine = tierflow.offload(model(), device="cuda", device_memory="8MiB" if mode == "auto" else None,
                              host_memory="256MiB", activations=mode, unit_bytes="64KiB")
    eopt = tierflow.AdamW(engine, lr=1e-2, fused=False)
    losses = []
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        loss.backward(); eopt.step(); eopt.zero_grad(); losses.append(loss.item())
    close = all(abs(a - b) < 1e-4 for a, b in zip(losses, ref_losses))
    ok &= close
    print(mode, close, losses, ref_losses, engine.activations.describe(), engine.budget_peaks()["device"],
          flush=True)
    engine.close()
sys.exit(0 if ok else 1)
