"""Scratch: per-step Python overhead of the engine on a model with negligible compute."""
import cProfile, pstats, sys, time, torch, copy
import tierflow
from tierflow.models import build_model
torch.manual_seed(0)
model = build_model("llama-100m")
import transformers
cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=14,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
model = transformers.AutoModelForCausalLM.from_config(cfg)
ref = copy.deepcopy(model)
placement = sys.argv[1] if len(sys.argv) > 1 else "device"
engine = tierflow.offload(model, placement=placement, unit_bytes="64KiB")
print("units", len(engine.units))
opt = tierflow.AdamW(engine, lr=1e-4)
ropt = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=True)
ids = torch.randint(0, 256, (1, 16))
def step(m, o, clip):
    loss = m(input_ids=ids, labels=ids).loss; loss.backward(); clip(); o.step(); o.zero_grad(); loss.item()
for _ in range(3):
    step(engine, opt, lambda: opt.clip_grad_norm_(1.0)); step(ref, ropt, lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))
for name, fn in (("torch", lambda: step(ref, ropt, lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))),
                 ("tierflow", lambda: step(engine, opt, lambda: opt.clip_grad_norm_(1.0)))):
    t = time.perf_counter()
    for _ in range(20): fn()
    print(name, (time.perf_counter() - t) / 20 * 1e3, "ms/step")
pr = cProfile.Profile(); pr.enable()
for _ in range(10): step(engine, opt, lambda: opt.clip_grad_norm_(1.0))
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
