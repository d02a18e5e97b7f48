"""Why the logits' matrix keeps 4 bits a value (``planning.formats.HEAD_BITS``): the token rows calibration
uses least, stored in each format as the LM head alone or as the lookup alone, the other role left float.

A byte planner weighs every matrix by a quadratic model of the loss (``grad_sq * E||delta y||^2``). A logit's
error acts through ``exp()``: a rare token's logit raised by a few units takes probability from every other
token, which a quadratic model of small errors does not see. This benchmark measures the two roles apart on
the held-out fidelity suite, one-shot.

    python bench/head_bits.py    # ~10 minutes on 2 cores; writes bench/results/frontier/head-bits.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import HERE, bad_input, one_shot_fidelity_options, teacher_and_domains
from provenance import cpu_run, git_commit

from tqcompressor.data import calibration_ids
from tqcompressor.evaluation.fidelity import measure
from tqcompressor.planning.calibration import layer_statistics
from tqcompressor.planning.formats import row_importance, settings_named
from tqcompressor.planning.inventory import tied_embedding
from tqcompressor.quant.modules import QuantizedWeight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    one_shot_fidelity_options(parser)
    parser.add_argument("--rows", type=int, default=32768, help="the least important rows stored in the format")
    parser.add_argument("--formats", default="int4-g128-dq,int3-g64-dq,int2-g64-dq")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "frontier" / "head-bits.json")
    args = parser.parse_args()
    commit, started = git_commit(), time.perf_counter()
    teacher, tokenizer, domains = teacher_and_domains(args)
    name = tied_embedding(teacher)
    if name is None:
        bad_input(f"error: {args.model} has no tied token table; this benchmark splits a tied one's roles")
    ids = calibration_ids(args.calibration, teacher, tokenizer, args.calibration_tokens)
    stats = layer_statistics(teacher, [name], ids)[name]
    weight = teacher.get_submodule(name).weight.detach()
    tail = torch.argsort(row_importance(weight, stats), descending=True)[-args.rows :]
    points = []
    for fmt in args.formats.split(","):
        stored = QuantizedWeight.from_weight(weight, settings_named(fmt)).dequantize()
        for role in ("head", "lookup"):
            model = with_rows_in_role(teacher, tail, stored[tail], role)
            found = measure(model, teacher, domains, args.context, tokenizer)
            points.append(
                {
                    "format": fmt,
                    "role": role,
                    "fidelity_kl": found["fidelity_kl"],
                    "domains": {d: v["kl_to_teacher"] for d, v in found["domains"].items()},
                }
            )
            print(f"{fmt:>14}  {role:>6}  fidelity KL {found['fidelity_kl']:.4f}", flush=True)
    result = {
        **cpu_run(commit, args),
        "what": f"the {args.rows} rows of the tied token table that calibration weighs least, stored in each format "
        "in one role (as the LM head, or as the lookup), the other role float; fidelity KL on the held-out suite",
        "rows_seen_in_calibration": int((stats.lookup.token_counts[tail] > 0).sum()),
        "points": points,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))


def with_rows_in_role(teacher, rows: torch.Tensor, values: torch.Tensor, role: str):
    """A copy of ``teacher`` with its tied table untied and ``rows`` replaced by ``values`` in ``role`` only."""
    model = copy.deepcopy(teacher)
    changed = model.get_input_embeddings().weight.detach().clone()
    changed[rows] = values
    kept = model.get_input_embeddings().weight.detach().clone()
    head, lookup = (changed, kept) if role == "head" else (kept, changed)
    model.get_input_embeddings().weight = torch.nn.Parameter(lookup)
    model.get_output_embeddings().weight = torch.nn.Parameter(head)
    return model


def format_table(result: dict) -> str:
    rows = ["| rows' format | stored as | fidelity KL |", "| --- | --- | ---: |"]
    rows += [f"| {p['format']} | {p['role']} | {p['fidelity_kl']:.4f} |" for p in result["points"]]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
