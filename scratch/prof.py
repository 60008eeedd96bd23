"""Scratch: where does a CUDA step of tierflow with host-resident state spend its time?"""
import os, sys, time, torch
import tierflow
from tierflow.models import build_model
from tierflow.timeline import record_phases, save_timeline

out = os.environ.get("OUT", "/tmp")
placement = sys.argv[1] if len(sys.argv) > 1 else "host"
seq = 512
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 256, (1, seq), generator=gen).cuda() for _ in range(8)]
engine = tierflow.offload(build_model("llama-100m"), device="cuda", placement=placement)
opt = tierflow.AdamW(engine, lr=1e-4)
def step(ids):
    t = time.perf_counter()
    loss = engine(input_ids=ids, labels=ids).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad(); loss.item()
    t3 = time.perf_counter()
    return t1 - t, t2 - t1, t3 - t2
for ids in batches[:3]:
    step(ids)
engine.events.enable(); record_phases(engine)
for ids in batches[3:6]:
    print(placement, "fwd/bwd/opt s: %.3f %.3f %.3f" % step(ids), flush=True)
save_timeline(engine, f"{out}/timeline_{placement}.png")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step(batches[6])
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))
