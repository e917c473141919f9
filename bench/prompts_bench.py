"""Exact-length prompts for real tokenizers: how many come out exact, and what one costs to build.

python bench/prompts_bench.py                       # the tiny model's tokenizer (built in a temporary directory)
python bench/prompts_bench.py DIR [DIR ...]         # local tokenizer directories, e.g. from
                                                    # `testbed model import-smollm2 DIR`
Every length from the shortest possible to --up-to, plus 1,000/2,000/4,000, with --seeds seeds each, is
re-counted with transformers' AutoTokenizer (what vLLM loads); the time is the median build time of a prompt
(one verifying encode included). Needs the vLLM extra (transformers, tokenizers).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from workloads.prompts import TokenizerPrompts

SIZES = (8, 64, 256, 1000, 2000, 4000)


def measure(path: Path, up_to: int, seeds: int) -> dict[str, object]:
    from transformers import AutoTokenizer

    t = time.perf_counter()
    prompts = TokenizerPrompts(path)
    load_s = time.perf_counter() - t
    reference = AutoTokenizer.from_pretrained(str(path))
    reference.model_max_length = 1 << 30  # counting only: no warning for prompts past the model's context
    lengths = [*range(prompts.special_tokens + 1, up_to + 1), *(n for n in SIZES if n > up_to)]
    exact = total = 0
    cost: dict[int, list[float]] = {n: [] for n in SIZES}
    for n in lengths:
        for seed in range(seeds):
            t = time.perf_counter()
            text = prompts(n, seed)
            dt = time.perf_counter() - t
            total += 1
            exact += len(reference.encode(text)) == n
            if n in cost:
                cost[n].append(dt)
    row: dict[str, object] = {
        "tokenizer": f"{path.name} ({len(reference)} tokens, {prompts.special_tokens} special/prompt)",
        "load s": f"{load_s:.2f}", "exact": f"{exact}/{total}",
    }
    row.update({f"ms @{n}": f"{1000 * statistics.median(v):.2f}" for n, v in cost.items() if v})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", type=Path, help="tokenizer directories (default: the tiny model's)")
    ap.add_argument("--up-to", type=int, default=300, help="test every length up to this")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = args.dirs
        if not dirs:
            from deploy.models import build_tiny

            dirs = [build_tiny(Path(tmp) / "tiny-llama", seed=0)]
        rows = [measure(d, args.up_to, args.seeds) for d in dirs]
    table = Table(title="Prompts of an exact token count (special tokens included)")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*[str(row.get(c, "")) for c in rows[0]])
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
