"""Side-by-side benchmarks: tierflow and its reference in one run, with ratios.

    tierflow bench io     NVMe tier vs fio (sequential read/write) and compute overlap
    tierflow bench train  step time vs plain PyTorch (in memory and with NVMe spill)
    tierflow bench optim  CPU AdamW vs torch (fused/foreach) and DeepSpeed, and memcpy bandwidth
    tierflow bench transfer  host<->device copies from the pinned pool vs a plain copy_ (CUDA)
    tierflow bench calibrate  measure this machine's figures for the cost model (cached)
    tierflow bench plan-accuracy  the cost model's predictions against real training steps
    tierflow bench scale  step time and per-rank memory of 1 and 2 data-parallel ranks (torchrun)
    tierflow bench generate  generation beyond memory vs accelerate's disk offload (and fio)
    tierflow bench moe    a mixture of experts beyond memory: routed experts only vs accelerate's disk offload
    tierflow bench quant     compressed frozen weights (int8 / int4) vs fp32: bytes, tokens/s, quality
    tierflow bench activations  longest trainable sequence in a device budget vs PyTorch and HF checkpointing
    tierflow bench infinity  NVMe-homed training on the CPU vs DeepSpeed ZeRO-Infinity, and the disk bound
    tierflow bench gpu  the 1 B bf16 run of the NaN report: tierflow vs plain PyTorch losses, PASS/FAIL (CUDA)
    tierflow bench throughput  GPU training throughput vs torch, DeepSpeed ZeRO-3 offload and FSDP2 offload
                      (`tierflow bench train --device cuda` runs it, with the train flags given)
"""
from __future__ import annotations

import argparse

HELP = "run tierflow and its baselines side by side and print ratios"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    io = sub.add_parser("io", help="NVMe tier throughput vs fio, and compute overlap")
    io.add_argument("--dir", default="tierflow-io-bench", help="directory on the disk to test")
    io.add_argument("--size", default="2GiB", help="bytes written and read (default 2GiB)")
    io.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    io.add_argument("--json", default=None, help="also write the rows to this JSON file")
    train = sub.add_parser("train", help="training step time vs plain PyTorch (with --device cuda: `bench "
                           "throughput`, given the flags set here)")
    # (None: the flag was not given. On a CPU it takes the default in TRAIN_DEFAULTS; with
    # --device cuda only the flags given are passed on to `bench throughput`.)
    train.add_argument("--model", default=None, help="a built-in Llama (default llama-100m; with --device cuda: "
                       "bench throughput's 0.94 B Llama)")
    train.add_argument("--steps", type=int, default=None, help="default 6 (with --device cuda: 8)")
    train.add_argument("--warmup", type=int, default=None, help="default 2 (with --device cuda: 3)")
    train.add_argument("--seq-len", type=int, default=None, help="default 256 (with --device cuda: 1024)")
    train.add_argument("--device-memory", default=None, help="default 256MiB (with --device cuda: 4GiB)")
    train.add_argument("--host-memory", default=None, help="default 512MiB (with --device cuda: 64GiB for "
                       "tierflow-host, 8GiB for tierflow-nvme; a value given sets both)")
    train.add_argument("--nvme", default=None, help="spill directory (default: a temporary one)")
    train.add_argument("--disk-gbps", type=float, default=None,
                       help="disk bandwidth (GB/s, e.g. from `tierflow bench io`) for the physical bound "
                            "(CPU only)")
    train.add_argument("--device", default="cpu", help="compute device: cpu (default), or cuda: runs `tierflow "
                       "bench throughput` with the flags given here")
    train.add_argument("--json", default=None)
    optim = sub.add_parser("optim", help="CPU AdamW vs torch and DeepSpeed, and memcpy bandwidth")
    optim.add_argument("--numel", type=int, default=100_000_000, help="parameters (default 1e8)")
    optim.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    optim.add_argument("--json", default=None, help="also write the rows to this JSON file")
    transfer = sub.add_parser("transfer", help="host<->device copies from the pinned pool (needs CUDA)")
    transfer.add_argument("--size", default="1GiB", help="bytes copied each way (default 1GiB)")
    transfer.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    transfer.add_argument("--json", default=None, help="also write the rows to this JSON file")
    calibrate = sub.add_parser("calibrate", help="measure compute, memory, NVMe and AdamW speed (cached)")
    calibrate.add_argument("--device", default="cpu", help="compute device: cpu or cuda")
    calibrate.add_argument("--dtype", default=None, help="compute dtype (default float32)")
    calibrate.add_argument("--dir", default=None, help="directory on the NVMe disk (default: user cache)")
    calibrate.add_argument("--recalibrate", action="store_true", help="measure again even if cached")
    calibrate.add_argument("--json", default=None, help="also write the figures to this JSON file")
    scale = sub.add_parser("scale", help="step time and per-rank memory of 1 and N ranks (torchrun, gloo/NCCL)")
    scale.add_argument("--model", default="llama-100m")
    scale.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes (default: 1 2)")
    scale.add_argument("--steps", type=int, default=6)
    scale.add_argument("--warmup", type=int, default=2)
    scale.add_argument("--batch-size", type=int, default=1, help="sequences per rank per step")
    scale.add_argument("--seq-len", type=int, default=256)
    scale.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    scale.add_argument("--placement", default="host", choices=("device", "host", "nvme"))
    scale.add_argument("--nvme", default=None, help="spill directory for --placement nvme")
    scale.add_argument("--force-sharding", action="store_true",
                       help="shard even with one rank (the NCCL path on a single GPU)")
    scale.add_argument("--json", default=None)
    accuracy = sub.add_parser("plan-accuracy", help="predicted vs measured step time and peak memory")
    accuracy.add_argument("--sizes", nargs="+", default=None,
                          help="models: llama-20m llama-50m llama-100m (default: the built-in matrix)")
    accuracy.add_argument("--settings", nargs="+", default=None,
                          help="budgets/placements: device host mixed nvme train (default: the built-in matrix)")
    accuracy.add_argument("--seq-len", type=int, default=256)
    accuracy.add_argument("--steps", type=int, default=5, help="measured steps (median)")
    accuracy.add_argument("--warmup", type=int, default=2)
    accuracy.add_argument("--nvme", default=None, help="spill directory (default: a temporary one)")
    accuracy.add_argument("--recalibrate", action="store_true", help="calibrate first even if cached")
    accuracy.add_argument("--calibrate-each", action="store_true",
                          help="calibrate again before each configuration (machines shared with others drift)")
    accuracy.add_argument("--quiet-wait", type=float, default=120.0,
                          help="seconds to wait for other processes to go idle before each measurement")
    accuracy.add_argument("--json", default=None)
    gen = sub.add_parser("generate", help="generation with a model bigger than memory vs accelerate disk offload")
    gen.add_argument("--dir", default="/tmp/tierflow-generate-bench",
                     help="directory for the model, the spill files and fio's file (on the disk to test)")
    gen.add_argument("--hidden", type=int, default=1536)
    gen.add_argument("--layers", type=int, default=None, help="default 14 (with --matrix: from --factors)")
    gen.add_argument("--intermediate", type=int, default=4096)
    gen.add_argument("--vocab", type=int, default=8000)
    gen.add_argument("--device", default=None, help="compute device: cpu (default) or cuda (not with --matrix)")
    gen.add_argument("--device-memory", default=None, help="default 256MiB (with --matrix: --budgets)")
    gen.add_argument("--host-memory", default=None, help="default 512MiB (with --matrix: --budgets)")
    gen.add_argument("--limit", default=None,
                     help="cgroup memory limit, page cache included (default: the budgets + 640MiB)")
    gen.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    gen.add_argument("--prompt-len", type=int, default=16)
    gen.add_argument("--new-tokens", type=int, default=8)
    gen.add_argument("--threads", type=int, default=2, help="torch threads of each contender")
    gen.add_argument("--matrix", action="store_true",
                     help="run the matrix: models --factors x the --limit, each pair of --budgets, each batch")
    gen.add_argument("--factors", type=float, nargs="+", default=[2, 4, 8],
                     help="with --matrix: model sizes, as multiples of the memory limit")
    gen.add_argument("--budgets", nargs="+", default=["64MiB/96MiB", "128MiB/224MiB"],
                     help="with --matrix: DEVICE/HOST budget pairs, tight to roomy")
    gen.add_argument("--timeout", type=float, default=None,
                     help="seconds each contender may run (default: 900, with --matrix 1800); an accelerate "
                          "run that times out gives a lower bound of the ratio")
    gen.add_argument("--json", default=None)
    moe = sub.add_parser("moe", help="a mixture-of-experts model bigger than memory: experts fetched as "
                         "routed vs accelerate disk offload")
    moe.add_argument("--dir", default="/tmp/tierflow-moe-bench", help="directory for the model and spill files")
    moe.add_argument("--hidden", type=int, default=1024)
    moe.add_argument("--layers", type=int, default=16)
    moe.add_argument("--intermediate", type=int, default=1408, help="each expert's intermediate size")
    moe.add_argument("--experts", type=int, default=8)
    moe.add_argument("--top-k", type=int, default=2)
    moe.add_argument("--vocab", type=int, default=8000)
    moe.add_argument("--device-memory", default="384MiB")
    moe.add_argument("--host-memory", default="128MiB")
    moe.add_argument("--limit", default=None, help="cgroup memory limit (default: the budgets + 640MiB)")
    moe.add_argument("--batch", type=int, default=1)
    moe.add_argument("--prompt-len", type=int, default=16)
    moe.add_argument("--new-tokens", type=int, default=8)
    moe.add_argument("--threads", type=int, default=2)
    moe.add_argument("--device", default="cpu", help="compute device of both contenders (cpu or cuda)")
    moe.add_argument("--json", default=None)
    qb = sub.add_parser("quant", help="compressed frozen weights (int8 / int4) vs fp32: bytes per decode step, "
                        "tokens/s from disk, held-out loss and greedy agreement")
    qb.add_argument("--dir", default="/tmp/tierflow-quant-bench", help="model, spill and data directory")
    qb.add_argument("--what", choices=("both", "speed", "quality"), default="both")
    qb.add_argument("--hidden", type=int, default=1024)
    qb.add_argument("--layers", type=int, default=24)
    qb.add_argument("--intermediate", type=int, default=2816)
    qb.add_argument("--vocab", type=int, default=8000)
    qb.add_argument("--device", default="cpu", help="compute device: cpu or cuda")
    qb.add_argument("--device-memory", default="128MiB")
    qb.add_argument("--host-memory", default="192MiB")
    qb.add_argument("--limit", default="920MiB", help="cgroup memory limit, page cache included")
    qb.add_argument("--placements", nargs="+", default=["nvme", "auto"], choices=("nvme", "auto", "host"))
    qb.add_argument("--batch", type=int, default=1)
    qb.add_argument("--new-tokens", type=int, default=8)
    qb.add_argument("--threads", type=int, default=2)
    qb.add_argument("--json", default=None)
    acts = sub.add_parser("activations", help="longest sequence within a device budget: tierflow auto vs "
                          "PyTorch and Hugging Face gradient checkpointing, and step time")
    acts.add_argument("--layers", type=int, default=16)
    acts.add_argument("--hidden", type=int, default=128)
    acts.add_argument("--device-memory", default="160MiB", help="the fixed device budget")
    acts.add_argument("--host-memory", default="4GiB")
    acts.add_argument("--grain", type=int, default=256, help="sequence lengths searched are multiples of this")
    acts.add_argument("--limit", type=int, default=32768, help="longest sequence tried")
    acts.add_argument("--steps", type=int, default=3, help="timed steps (median), after 2 warm-up steps")
    acts.add_argument("--nvme", default=None, help="spill directory for tierflow (default: none)")
    acts.add_argument("--json", default=None)
    add_infinity_arguments(sub)
    add_gpu_arguments(sub)
    add_throughput_arguments(sub)


def add_throughput_arguments(sub) -> None:
    from tierflow.bench.throughput import CONTENDERS, EXTRA_CONTENDERS

    tp = sub.add_parser("throughput", help="GPU training throughput: tierflow vs torch, DeepSpeed ZeRO-3 offload, "
                        "FSDP2 offload (each in its own process, same weights and batches)")
    tp.add_argument("--contenders", nargs="+", default=list(CONTENDERS),
                    help=f"of {', '.join(CONTENDERS + EXTRA_CONTENDERS)}; a tierflow one may take offload options, "
                         f"e.g. 'tierflow-host[activations=auto,device_memory=10GiB]'")
    tp.add_argument("--device", default="cuda", help="compute device (default cuda)")
    tp.add_argument("--steps", type=int, default=8, help="steps per contender (default 8)")
    tp.add_argument("--warmup", type=int, default=3, help="steps left out of the median (default 3)")
    tp.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    tp.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    for name, default in (("hidden", 2048), ("layers", 16), ("intermediate", 5504), ("heads", 32), ("vocab", 32000)):
        tp.add_argument(f"--{name}", type=int, default=default, help=f"model size (default {default})")
    tp.add_argument("--device-memory", default="4GiB", help="tierflow's device budget (default 4GiB)")
    tp.add_argument("--host-memory", default="64GiB", help="tierflow-host's host budget (default 64GiB)")
    tp.add_argument("--nvme-host-memory", default="8GiB", help="tierflow-nvme's host budget (default 8GiB)")
    tp.add_argument("--nvme", default=None, help="tierflow's spill directory (default: a temporary one)")
    tp.add_argument("--profile-dir", default=None,
                    help="write tierflow's timeline, lane totals and a torch.profiler table of its last step here")
    tp.add_argument("--timeout", type=float, default=None, help="seconds per contender before it is stopped")
    tp.add_argument("--json", default=None)


def run_throughput(args) -> int:
    from tierflow.bench.gpu import ModelShape
    from tierflow.bench.throughput import ThroughputConfig, run_throughput_bench, same_start

    shape = ModelShape(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=args.heads,
                       vocab=args.vocab)
    cfg = ThroughputConfig(shape=shape, batch=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                           warmup=args.warmup, device=args.device, device_memory=args.device_memory,
                           host_memory=args.host_memory, nvme_host_memory=args.nvme_host_memory, nvme=args.nvme,
                           profile_dir=args.profile_dir)
    results = run_throughput_bench(cfg, tuple(args.contenders), args.json, args.timeout)
    return 0 if all(ran_or_not_installed(r) for r in results) and same_start(results) else 1


def ran_or_not_installed(result: dict) -> bool:
    """A contender that ran, or a baseline whose library is not installed here (skipped)."""
    error = result.get("error")
    return error is None or (not result["name"].startswith("tierflow") and "No module named" in error)


def add_infinity_arguments(sub) -> None:
    from tierflow.bench.infinity import CONTENDERS as INFINITY_CONTENDERS

    inf = sub.add_parser("infinity", help="NVMe-homed training on the CPU vs DeepSpeed ZeRO-Infinity (171 M "
                         "Llama), peak RSS, and tierflow's step against its disk bound")
    inf.add_argument("--steps", type=int, default=8)
    inf.add_argument("--warmup", type=int, default=2)
    inf.add_argument("--batch-size", type=int, default=1)
    inf.add_argument("--seq-len", type=int, default=128)
    for name, default in (("hidden", 1024), ("layers", 12), ("intermediate", 2816), ("heads", 16), ("vocab", 8000)):
        inf.add_argument(f"--{name}", type=int, default=default, help=f"model size (default {default})")
    inf.add_argument("--device-memory", default="256MiB", help="tierflow's device budget")
    inf.add_argument("--host-memory", default="1GiB", help="tierflow's host budget")
    inf.add_argument("--nvme", default=None, help="spill directory (default: a temporary one, removed after)")
    inf.add_argument("--threads", type=int, default=0, help="torch threads per contender (0: torch's default)")
    inf.add_argument("--contenders", nargs="+", default=list(INFINITY_CONTENDERS), choices=INFINITY_CONTENDERS)
    inf.add_argument("--rounds", type=int, default=1,
                     help="run the contenders this many times, round after round; prints each round and "
                          "tierflow's median ratios over them")
    inf.add_argument("--json", default=None)


def add_gpu_arguments(sub) -> None:
    gpu = sub.add_parser("gpu", help="1 B Llama, bf16: tierflow (host, NVMe) vs plain PyTorch losses, PASS/FAIL; "
                         "exit status 1 if a criterion fails")
    gpu.add_argument("--cpu-smoke", action="store_true",
                     help="tiny model on the CPU (seconds): checks the checker, not the GPU")
    gpu.add_argument("--device", default=None, help="compute device (default: cuda; cpu with --cpu-smoke)")
    gpu.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20)")
    gpu.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 4)")
    gpu.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024)")
    for name, default in (("hidden", 2048), ("layers", 16), ("intermediate", 5504), ("heads", 32), ("vocab", 32000)):
        gpu.add_argument(f"--{name}", type=int, default=None, help=f"model size (default {default})")
    gpu.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                     help="bf16: losses within 1e-2 of torch autocast; fp32: within 1e-4")
    gpu.add_argument("--lr", type=float, default=1e-4)
    gpu.add_argument("--seed", type=int, default=0)
    gpu.add_argument("--lag-ms", type=float, default=0.0,
                     help="sleep queued on the GPU at each block's forward and before clipping (default 0)")
    gpu.add_argument("--contenders", nargs="+", default=["tierflow-host", "tierflow-nvme"],
                     choices=("tierflow-host", "tierflow-nvme"))
    gpu.add_argument("--nvme", default=None, help="spill directory (default: a new one under /tmp, removed after)")
    gpu.add_argument("--fault", default="none", choices=("none", "nan", "diverge"),
                     help="corrupt tierflow's logits on purpose: the check must then FAIL")
    gpu.add_argument("--json", default=None, help="write the report here (rewritten after every contender)")
    gpu.add_argument("--summary", default=None, help="also write the printed table to this file")


def run(args) -> int:
    from tierflow.config import parse_size

    if args.bench == "io":
        from tierflow.bench.io import run_io_bench
        run_io_bench(args.dir, parse_size(args.size, what="--size"), args.json, repeats=args.repeats)
    elif args.bench == "throughput":
        return run_throughput(args)
    elif args.bench == "train" and args.device.startswith("cuda"):
        return run_throughput(throughput_args_of_train(args))
    elif args.bench == "train":
        from tierflow.bench.train import run_train_bench
        train = with_defaults(args, TRAIN_DEFAULTS)
        run_train_bench(train.model, train.steps, train.warmup, train.seq_len, train.device_memory,
                        train.host_memory, train.nvme, train.disk_gbps, train.json, train.device)
    elif args.bench == "optim":
        from tierflow.bench.optim import run_optim_bench
        run_optim_bench(args.numel, args.repeats, args.json)
    elif args.bench == "transfer":
        from tierflow.bench.transfer import run_transfer_bench
        run_transfer_bench(parse_size(args.size, what="--size"), args.json, repeats=args.repeats)
    elif args.bench == "calibrate":
        from tierflow.bench.calibrate import run_calibrate_bench
        run_calibrate_bench(args.device, args.dtype, args.dir, args.recalibrate, args.json)
    elif args.bench == "scale":
        from tierflow.bench.scale import run_scale_bench
        run_scale_bench(args.model, tuple(args.ranks), args.steps, args.warmup, args.batch_size, args.seq_len,
                        args.device, args.placement, args.nvme, args.force_sharding, args.json)
    elif args.bench == "plan-accuracy":
        from tierflow.bench.plan_accuracy import run_plan_accuracy_bench
        run_plan_accuracy_bench(args.sizes, args.settings, args.seq_len, args.steps, args.warmup,
                                args.nvme, args.recalibrate, args.json, quiet_wait=args.quiet_wait,
                                calibrate_each=args.calibrate_each)
    elif args.bench == "generate":
        if args.matrix:
            from tierflow.bench.generate_matrix import run_generate_matrix
            from tierflow.errors import ConfigError
            given = [flag for flag, value in (("--layers", args.layers), ("--device", args.device),
                                              ("--device-memory", args.device_memory),
                                              ("--host-memory", args.host_memory)) if value is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} not taken with --matrix: it runs on the CPU, its models' "
                                  f"layers come from --factors and its budgets from --budgets")
            run_generate_matrix(args.dir, args.limit or "768MiB", tuple(args.factors), parse_budgets(args.budgets),
                                tuple(args.batches), args.hidden, args.intermediate, args.vocab, args.prompt_len,
                                args.new_tokens, args.threads, args.json, args.timeout or 1800.0)
            return 0
        from tierflow.bench.generate import run_generate_bench
        gen = with_defaults(args, GENERATE_DEFAULTS)
        run_generate_bench(args.dir, args.hidden, gen.layers, args.intermediate, args.vocab, gen.device,
                           gen.device_memory, gen.host_memory, args.limit, tuple(args.batches),
                           args.prompt_len, args.new_tokens, args.threads, args.json, args.timeout or 900.0)
    elif args.bench == "moe":
        from tierflow.bench.moe import run_moe_bench
        run_moe_bench(args.dir, args.hidden, args.layers, args.intermediate, args.experts, args.top_k, args.vocab,
                      args.device_memory, args.host_memory, args.limit, args.batch, args.prompt_len,
                      args.new_tokens, args.threads, args.json, device=args.device)
    elif args.bench == "quant":
        from tierflow.bench.quant import run_quant_bench
        run_quant_bench(args.dir, speed=args.what != "quality", quality=args.what != "speed", json_path=args.json,
                        hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, vocab=args.vocab,
                        device=args.device, device_memory=args.device_memory, host_memory=args.host_memory,
                        limit=args.limit, placements=tuple(args.placements), batch=args.batch,
                        new_tokens=args.new_tokens, threads=args.threads)
    elif args.bench == "activations":
        from tierflow.bench.activations import run_activations_bench
        run_activations_bench(args.layers, args.hidden, args.device_memory, args.host_memory, args.grain,
                              args.limit, args.steps, args.nvme, args.json)
    elif args.bench == "infinity":
        from tierflow.bench.gpu import ModelShape
        from tierflow.bench.infinity import InfinityConfig, run_infinity_bench
        shape = ModelShape(args.hidden, args.layers, args.intermediate, args.heads, args.vocab)
        cfg = InfinityConfig(shape, args.batch_size, args.seq_len, args.steps, args.warmup,
                             device_memory=args.device_memory, host_memory=args.host_memory,
                             nvme=args.nvme or "", threads=args.threads)
        results = run_infinity_bench(cfg, tuple(args.contenders), args.json, rounds=args.rounds)
        return int(any("error" in r and not r["error"].endswith("skipped") for r in results))
    elif args.bench == "gpu":
        from tierflow.bench.gpu_check import run_gpu_bench
        return run_gpu_bench(args)
    return 0


# Defaults of flags that default to None in the parser (None: not given, which matters for the
# cases that take them elsewhere: `bench train --device cuda`, `bench generate --matrix`).
TRAIN_DEFAULTS = dict(model="llama-100m", steps=6, warmup=2, seq_len=256, device_memory="256MiB",
                      host_memory="512MiB")
GENERATE_DEFAULTS = dict(layers=14, device="cpu", device_memory="256MiB", host_memory="512MiB")


def with_defaults(args, defaults: dict) -> argparse.Namespace:
    """`args` with each flag that was not given (None) set to its entry in `defaults`."""
    return argparse.Namespace(**{name: defaults.get(name) if value is None else value
                                 for name, value in vars(args).items()})


def throughput_args_of_train(args) -> argparse.Namespace:
    """`bench train --device cuda` is `bench throughput` with the flags given to `bench train`
    (the others keep throughput's defaults: the 1 B Llama of issue 15): the model's shape from a
    built-in Llama, one host budget for both tierflow contenders."""
    from tierflow.errors import ConfigError
    from tierflow.models import builtin_config

    if args.disk_gbps is not None:
        raise ConfigError("--disk-gbps is not used with --device cuda (bench throughput measures no disk bound)")
    flags = ["throughput", "--device", args.device]
    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup), ("--seq-len", args.seq_len),
                        ("--device-memory", args.device_memory), ("--host-memory", args.host_memory),
                        ("--nvme-host-memory", args.host_memory), ("--nvme", args.nvme), ("--json", args.json)):
        if value is not None:
            flags += [flag, str(value)]
    if args.model is not None:
        config = builtin_config(args.model)
        if config.model_type != "llama" or config.tie_word_embeddings:
            raise ConfigError(f"--model {args.model} with --device cuda: bench throughput builds a Llama with "
                              f"untied embeddings; give its shape to `tierflow bench throughput` instead")
        flags += ["--hidden", str(config.hidden_size), "--layers", str(config.num_hidden_layers),
                  "--intermediate", str(config.intermediate_size), "--heads", str(config.num_attention_heads),
                  "--vocab", str(config.vocab_size)]
    parser = argparse.ArgumentParser(prog="tierflow bench throughput")
    add_arguments(parser)
    return parser.parse_args(flags)


def parse_budgets(pairs) -> tuple:
    """'DEVICE/HOST' strings -> ((device, host), ...); a clear error for anything else."""
    from tierflow.errors import ConfigError

    parsed = []
    for pair in pairs:
        parts = pair.split("/")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--budgets takes DEVICE/HOST pairs such as 48MiB/96MiB, got {pair!r}")
        parsed.append((parts[0], parts[1]))
    return tuple(parsed)
