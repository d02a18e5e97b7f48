"""Which start of the permutation search wins on real SmolLM2-135M matrices, and what each costs.

``permuted_kronecker`` alternates from up to three built-in starts (``similarity``, ``spectral``,
``identity``) and keeps the best. ``auto`` measures a search per B shape for every matrix, so a
start that never wins on trained weights is time it need not spend. For every projection of a few
blocks and every B shape of ``auto``'s menu (at the largest rank it searches with), this runs the
search from each start alone and records the weight-space relative error it ends at and its seconds
(building the start included), and the error of the start itself, before any search (whether a
start that begins behind ever ends ahead: the search skips such starts). Writes
bench/results/permutation_starts/permutation-starts.json and prints a table.

    python bench/permutation_starts.py [--layers 2,10,20,28]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import HERE
from provenance import git_commit  # bench/provenance.py (scripts run from bench/)

import tqcompressor as tqc
from tqcompressor.evaluation.report import table
from tqcompressor.linalg.permutation import SEARCH_STARTS, permuted_kronecker
from tqcompressor.structures.kronecker.settings import AUTO_B_SHAPES, AUTO_RANKS
from tqcompressor.versions import library_versions

MATRICES = [f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")
]
MAX_ITERATIONS = 10  # as auto's candidate_menu searches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="2,10,20,28")
    parser.add_argument("--out", default=str(HERE / "results" / "permutation_starts" / "permutation-starts.json"))
    args = parser.parse_args()
    commit = git_commit()
    model = tqc.load_model(args.model).model
    searches, wins, won_from_behind = [], dict.fromkeys(SEARCH_STARTS, 0), 0
    seconds = dict.fromkeys(SEARCH_STARTS, 0.0)
    for block in [int(i) for i in args.layers.split(",")]:
        for matrix in MATRICES:
            name = f"model.layers.{block}.{matrix}"
            w = model.get_submodule(name).weight.detach().to(torch.float64)
            for b_shape in AUTO_B_SHAPES:
                a_shape = (w.shape[0] // b_shape[0], w.shape[1] // b_shape[1])
                rank = max(r for r in AUTO_RANKS if r < b_shape[0] * b_shape[1])
                errors, start_errors = {}, {}
                for start in SEARCH_STARTS:
                    t0 = time.perf_counter()
                    found = permuted_kronecker(w, a_shape, b_shape, rank, MAX_ITERATIONS, start_names=(start,))
                    seconds[start] += time.perf_counter() - t0
                    errors[start], start_errors[start] = found.history[-1], found.history[0]
                winner = min(SEARCH_STARTS, key=lambda s: errors[s])
                wins[winner] += 1
                # a winner whose start was behind another start's end: skip_worse_starts would miss it
                behind = any(start_errors[winner] >= errors[s] for s in SEARCH_STARTS if s != winner)
                won_from_behind += behind
                searches.append(
                    {
                        "matrix": name,
                        "b_shape": list(b_shape),
                        "rank": rank,
                        "start_error": start_errors,
                        "error": errors,
                        "best": winner,
                        "won_from_behind": behind,
                    }
                )
                print(name, b_shape, rank, {s: round(e, 4) for s, e in errors.items()}, flush=True)
    result = {
        "commit": commit,
        "versions": library_versions(),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "layers": args.layers,
        "b_shapes": [list(b) for b in AUTO_B_SHAPES],
        "max_iterations": MAX_ITERATIONS,
        "error": "relative Frobenius error of the weight after the search from that start alone",
        "start_error": "the same error of Van Loan's fit at the start, before any search",
        "wins": wins,
        "won_from_behind": won_from_behind,
        "seconds": seconds,
        "searches": searches,
    }
    with open(args.out, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    print(table(["start", "searches won", "seconds"], [[s, wins[s], seconds[s]] for s in SEARCH_STARTS]))
    print(
        f"{len(searches)} searches, {won_from_behind} won by a start that began behind another's end; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
