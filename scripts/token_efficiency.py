#!/usr/bin/env python
"""Token efficiency of a run's data: real tokens over the tokens a micro-batch computes.

Padded micro-batches compute every row to the longest sample's length; padding-free ones
(training/layout.py, the default) compute the real tokens only. The data is read, encoded and
ordered as a run does it (the run's reader and template, the first epoch's order of the seed),
with the model's own tokenizer; no weights are loaded.

    python scripts/token_efficiency.py --model DIR_OR_ID --data FILE
        [--format auto] [--max-seq-len 512] [--micro-batch-size 2 4 8] [--seed 3407] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from baton.training.data import DataError, check_format, detect_format, read_records  # noqa: E402


def sample_lengths(model: str, data: Path, fmt: str, max_seq_len: int, seed: int) -> list[int]:
    """Token counts of the samples in the run's first-epoch order."""
    from transformers import AutoTokenizer

    from baton.training.encode import Encoder
    from baton.training.order import epoch_permutation

    records = read_records(data)
    fmt = detect_format(data) if fmt == "auto" else fmt
    check_format(records, fmt, source=data)
    encoder = Encoder(AutoTokenizer.from_pretrained(model), fmt, max_seq_len)
    lengths = [len(encoder(r).input_ids) for r in records]
    return [lengths[i] for i in epoch_permutation(seed, 0, len(lengths))]


def report(lengths: list[int], micro_batch_sizes: list[int]) -> dict:
    from baton.training.layout import token_efficiency

    return {
        "samples": len(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "longest": max(lengths),
        "micro_batches": {str(m): {
            "padded": round(token_efficiency(lengths, m, padding_free=False), 4),
            "padding_free": round(token_efficiency(lengths, m, padding_free=True), 4),
        } for m in micro_batch_sizes},
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local model folder or a Hub id")
    parser.add_argument("--data", required=True, type=Path, help="JSONL, CSV or Parquet")
    parser.add_argument("--format", default="auto", choices=("auto", "text", "pairs", "chat"))
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        lengths = sample_lengths(args.model, args.data, args.format, args.max_seq_len,
                                 args.seed)
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = report(lengths, args.micro_batch_size)
    print(f"{result['samples']} samples, mean {result['mean_tokens']} tokens, longest "
          f"{result['longest']}")
    for m, row in result["micro_batches"].items():
        print(f"micro-batch {m}: padded {row['padded']:.1%}, padding-free "
              f"{row['padding_free']:.1%} of computed tokens are real")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
