"""One rank of the data-parallel tests (tests/test_distributed.py): run as a script with
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or without it as the
single-process reference with the whole batch."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import SMALL_UNITS, make_batches, make_tiny  # noqa: E402

import tierflow  # noqa: E402
from tierflow.dist import ranks as distributed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--placement", default="host")
    ap.add_argument("--nvme", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="global batch (rows), split over the ranks")
    ap.add_argument("--save", default=None, help="save a checkpoint after the steps")
    ap.add_argument("--resume", default=None, help="resume from this checkpoint first")
    ap.add_argument("--arch", default="llama", help="tiny model: llama, or gpt2 (tied embeddings)")
    ap.add_argument("--die-at-step", type=int, default=None, help="rank 1 exits abruptly at this step")
    ap.add_argument("--clip", type=float, default=0.5, help="max_norm of clip_grad_norm_")
    ap.add_argument("--as-ranks", type=int, default=1,
                    help="one process only: run the batch as this many micro-batches, the rows each "
                         "rank would get, each loss divided by their number (gradient accumulation)")
    args = ap.parse_args()

    distributed.init_from_env("cpu")
    torch.manual_seed(0)
    rank, world = distributed.rank(), distributed.world_size()
    nvme = os.path.join(args.nvme, f"rank{rank}") if args.nvme else None
    options = dict(device="cpu", nvme=nvme, placement=args.placement, **SMALL_UNITS)
    if args.resume:
        engine, opt = tierflow.resume(args.resume, model=make_tiny(args.arch), **options)
    else:
        engine = tierflow.offload(make_tiny(args.arch), **options)
        opt = tierflow.AdamW(engine, lr=1e-2, weight_decay=0.1)
    engine.eval()  # no dropout: ranks and the whole batch draw different masks
    batches = make_batches(args.steps, batch=args.batch, seed=7 if args.resume else 1)
    assert world == 1 or args.as_ranks == 1, "--as-ranks is the one-process reference"
    split = max(world, args.as_ranks)
    per_rank = args.batch // split
    losses, norms = [], []
    for step, ids in enumerate(batches):
        if args.die_at_step == step and rank == 1:
            os._exit(3)  # a crash: no cleanup, no goodbye to the other ranks
        if world > 1:
            mine = ids[rank * per_rank:(rank + 1) * per_rank]
            loss = engine(input_ids=mine, labels=mine).loss
            loss.backward()
        else:
            # The gradient the ranks average: g_0/split + g_1/split + ... (exact halving for 2).
            parts = []
            for r in range(split):
                mine = ids[r * per_rank:(r + 1) * per_rank]
                part = engine(input_ids=mine, labels=mine).loss
                (part / split).backward()
                parts.append(part.detach())
            loss = torch.stack(parts).sum() / split  # as the ranks' all-reduced mean below
        norms.append(float(opt.clip_grad_norm_(args.clip)))
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if world > 1:  # the mean over the ranks is the loss of the whole batch
            torch.distributed.all_reduce(total)
            total /= world
        losses.append(float(total))
    if args.save:
        engine.save(args.save)
    state = engine.state_dict()
    moments = engine.optimizer_state()
    if rank == 0:
        torch.save({"losses": losses, "norms": norms, "state": state,
                    "moments": {k: v["exp_avg_sq"] for k, v in moments.items()},
                    "placement": engine.placement()}, args.out)
    engine.close()
    if world > 1:
        # Ranks tear their process group down together: one that destroys its gloo group while
        # the other still saves its results aborted once at exit ("terminate called without an
        # active exception", SIGABRT after every collective had completed).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
