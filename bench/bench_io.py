"""Benchmark tierflow's NVMe tier against fio (thin wrapper over tierflow.bench.io).

    PYTHONPATH=src python bench/bench_io.py --dir /work/tierflow-io-bench --size 2G --json io.json
"""

import argparse

from tierflow.bench.io import parse_size, run_io_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="tierflow-io-bench",
                        help="directory on the disk to test (created; files removed after)")
    parser.add_argument("--size", default="2G", type=parse_size,
                        help="bytes to write and read, e.g. 2G, 512M (default 2G)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--repeats", default=5, type=int, help="runs per figure (median)")
    args = parser.parse_args()
    run_io_bench(args.dir, args.size, args.json, repeats=args.repeats)


if __name__ == "__main__":
    main()
