"""Nearest-neighbour search time against the bank size: faiss IndexFlatL2 (exact, what mhpc uses)
beside torch.mm of the same shape. One image's queries (784 patches, 1024 dims, k=1).

    .venv/bin/python bench/nn_scaling.py [--sizes 10000 100000 1000000] [--dim 1024]
"""

from __future__ import annotations

import argparse

import _common
import faiss
import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=784)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(_common.machine_line())
    print("| bank vectors | faiss flat ms/image | torch.mm ms/image | faiss / mm |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    for n in args.sizes:
        bank = rng.standard_normal((n, args.dim), dtype=np.float32)
        index = faiss.IndexFlatL2(args.dim)
        index.add(bank)
        q_t, b_t = torch.from_numpy(queries), torch.from_numpy(bank).T.contiguous()
        repeats = 3 if n < 1_000_000 else 1
        t = _common.interleaved({"faiss": lambda: index.search(queries, 1), "mm": lambda: torch.mm(q_t, b_t)},
                                repeats=repeats)
        print(f"| {n:,} | {t['faiss'] * 1e3:.1f} | {t['mm'] * 1e3:.1f} | {t['faiss'] / t['mm']:.2f} |", flush=True)
        del index, bank, b_t


if __name__ == "__main__":
    main()
