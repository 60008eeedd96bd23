# Offline check of the cost model against the H200 runs of docs/benchmarks.md ("GPU training throughput"):
# PYTHONPATH=src python bench/predict_gpu_runs.py ["dict(field=value)" overrides of the nominal GPU figures]
import dataclasses, torch, warnings
from tierflow.bench import gpu
from tierflow.config import OffloadConfig
from tierflow.core import figures
from tierflow.core.planner import predict
import transformers
warnings.simplefilter("ignore")
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(gpu.ONE_B.config(1024))
cal = figures.nominal("cuda", torch.bfloat16)
import sys
changes = eval(sys.argv[1]) if len(sys.argv) > 1 else {}
cal = dataclasses.replace(cal, **changes)
def fake_cfg(**kw):
    # Created for a CPU (no CUDA here), then moved to the GPU: host_in_place=False as on a GPU
    # (create() refuses it for CUDA; left True, host units would be charged no fetches).
    cfg = OffloadConfig.create(device="cpu", dtype=torch.bfloat16, host_in_place=False, **kw)
    return dataclasses.replace(cfg, device=torch.device("cuda", 0))
# The measured steps: the H200 runs recorded in docs/benchmarks.md, "GPU training throughput"
# (run 2 of the duplex AdamW table, and the 10 GiB and 16x1024 rows of the table above it).
for name, kw, batch, measured in (("4GiB unmanaged", dict(device_memory="4GiB", host_memory="64GiB"), 4, 0.461),
                                  ("10GiB auto", dict(device_memory="10GiB", host_memory="64GiB", activations="auto"), 4, 0.435),
                                  ("16x 32GiB host", dict(device_memory="32GiB", host_memory="64GiB", activations="auto"), 16, 0.529)):
    cfg = fake_cfg(**kw)
    placement = "host" if "host" in name else "auto"
    pred = predict(model, cfg, cal, batch, 1024, placement)
    st = pred.step
    print(f"{name}: predicted {st.step_s:.3f} measured {measured} ratio {measured/st.step_s:.2f} | compute {st.compute_s:.3f} transfer {st.transfer_s:.3f} optimizer {st.optimizer_s:.3f} fwd {st.forward_s:.3f} bwd {st.backward_s:.3f} {st.bottleneck} homes {[pred.placement.homes.count(t) for t in ('device','host','nvme')]} gpu_upd {sum(pred.placement.device_updates)}")
print(cal)
