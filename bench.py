"""Benchmarks for longvila: attention kernels and multi-modal sequence parallelism, measured on real runs.

    python bench.py kernels                               # Triton vs torch SDPA (flash, cuDNN), one GPU
    torchrun --nproc_per_node 2 bench.py sp               # zigzag ring vs ring vs Ulysses vs torch context_parallel

Each prints a table (TFLOP/s, ms, scaling efficiency) and can write it as JSON (--json PATH).
"""
import argparse
import json
import os
import sys

import torch

# name -> (function adding the sub-command's flags, function running it and returning a list of result dicts);
# each section below registers itself here.
BENCHMARKS = {}

# -----------------------------------------------------------------------------
# kernels: Triton flash attention vs torch SDPA backends (owner: kernels)

# -----------------------------------------------------------------------------
# sp: sequence-parallel attention layouts vs one GPU and torch context_parallel (owner: MM-SP)

# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    commands = {}
    for name, (add_args, run) in BENCHMARKS.items():
        p = sub.add_parser(name)
        add_args(p)
        p.add_argument("--json", default=None, help="also write the results table to this JSON file")
        commands[name] = run
    args = parser.parse_args(argv)
    rows = commands[args.what](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)



if __name__ == "__main__":
    main()
