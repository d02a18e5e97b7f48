"""A model's perplexity with and without the token its tokenizer puts before every text.

Gemma's and Llama's tokenizers start every text with ``<bos>``, and their models were trained that
way; ``tqcompressor.evaluation.evaluate`` and the distillation blocks lead with it (``data.start_token``).
This measures what leaving it out does: the same windows of WikiText-2 test, scored with and
without it. Writes bench/results/start_token/start-token.json and prints a table.

    python bench/start_token.py --model gemma3-270m [--eval-tokens 16384] [--context 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import HERE, eval_options
from provenance import cpu_run, git_commit  # bench/provenance.py (scripts run from bench/)

import tqcompressor as tqc
from tqcompressor.data import start_token, tokenize_text
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.evaluation.report import table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    eval_options(parser, eval_tokens=16384, model="gemma3-270m")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "start_token" / "start-token.json")
    args = parser.parse_args()
    commit = git_commit()  # the code this run imports now
    loaded = tqc.load_model(args.model)
    ids = tokenize_text(args.test, loaded.tokenizer, args.eval_tokens)
    start = start_token(loaded.tokenizer)
    rows = {}
    for label, lead in (("with the start token", True), ("without", False)):
        started = time.perf_counter()
        metrics = evaluate(loaded.model, ids, context=args.context, tokenizer=loaded.tokenizer, lead_with_start=lead)
        rows[label] = {**metrics, "seconds": time.perf_counter() - started}
    result = {
        **cpu_run(commit, args),
        "start_token": loaded.tokenizer.convert_ids_to_tokens(start) if start is not None else None,
        "eval": {"data": Path(args.test).name},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        table(
            ["windows", "perplexity", "bits per byte", "tokens"],
            [[label, r["perplexity"], r["bits_per_byte"], r["tokens"]] for label, r in rows.items()],
        )
    )
    print(f"{args.model}, start token {result['start_token']!r}; wrote {args.out}")


if __name__ == "__main__":
    main()
