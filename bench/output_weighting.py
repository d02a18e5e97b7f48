"""Should activation-aware SVD weight each output by the loss's gradient energy there (Fisher, as FWSVD)?

Issue #16, item 3. Calibration's backward pass records, per output ``i`` of every layer,
``r_i = E[(dL/dy_i)^2]``. A second-order Taylor step says the loss grows by about
``1/2 sum_i r_i E[(delta y_i)^2]`` when a layer's outputs move by ``delta y``; activation-aware SVD
minimises ``E||delta y||^2``, every output alike. This fits every target matrix of the model twice
at the same rank (--keeps: the fraction of each matrix's parameters kept, the same rule for both):

* ``svd_aware``: in ``E||(W - W') x||^2`` (what ``svd`` does with calibration);
* ``svd_aware + rows``: in ``E||diag(sqrt(r)) (W - W') x||^2``
  (:func:`tqcompressor.structures.lowrank.truncated_svd` with ``row_weights``),

swaps all of them in, and evaluates one-shot on WikiText-2 test and on held-out teacher samples. It
also sums over the layers both loss proxies, ``1/2 grad_sq E||delta y||^2`` (the scalar ``auto``
uses) and ``1/2 sum_i r_i E[(delta y_i)^2]``. Writes bench/results/output_weighting/output-weighting.json and prints a
table.

    python bench/output_weighting.py [--keeps 0.5,0.7]     # 2 CPU cores: ~10 min
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from common import bad_input, calibrated_options
from provenance import cpu_run, git_commit

import tqcompressor as tqc
from tqcompressor.data import text_block_source
from tqcompressor.evaluation.report import table
from tqcompressor.layers import bias_of, dense_weight_of, set_module
from tqcompressor.pipeline import evaluate_domains, evaluation_sets
from tqcompressor.planning.calibration import calibrate
from tqcompressor.planning.inventory import default_target_modules
from tqcompressor.structures.lowrank import LowRankLinear, truncated_svd

VARIANTS = ("svd_aware", "svd_aware + rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    calibrated_options(parser, eval_tokens=8192)
    parser.add_argument("--keeps", default="0.5,0.7", help="fractions of each matrix's parameters kept")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "output_weighting" / "output-weighting.json"
    )
    args = parser.parse_args()
    try:
        keeps = [float(k) for k in args.keeps.split(",") if k]
    except ValueError:
        keeps = []
    if not keeps or not all(0 < k < 1 for k in keeps):
        bad_input(f"--keeps {args.keeps}: give fractions between 0 and 1, e.g. 0.5,0.7")

    commit, started = git_commit(), time.perf_counter()
    loaded = tqc.load_model(args.model)
    teacher = loaded.model
    names = default_target_modules(teacher)
    blocks = text_block_source(args.calibration, loaded.tokenizer, 256)(0)
    ids = torch.stack([next(blocks) for _ in range(args.calibration_tokens // 256)])
    stats = calibrate(teacher, names, ids)
    eval_sets = evaluation_sets(args.test, loaded, args.eval_tokens, args.context, Path(tempfile.mkdtemp()))
    result = {
        **cpu_run(commit, args),
        "model": loaded.source,
        "targets": len(names),
        "teacher": scores(teacher, teacher, eval_sets, args.context),
        "points": [],
    }
    for keep in keeps:
        for variant in VARIANTS:
            t = time.perf_counter()
            student, proxies = fitted_student(teacher, names, stats, keep, weighted=variant != "svd_aware")
            result["points"].append(
                {
                    "keep": keep,
                    "variant": variant,
                    "params": tqc.count_parameters(student),
                    **proxies,
                    **scores(student, teacher, eval_sets, args.context),
                    "seconds": time.perf_counter() - t,
                }
            )
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
    result["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))


def fitted_student(teacher, names: list[str], stats: dict, keep: float, weighted: bool):
    """A copy of ``teacher`` with every matrix in ``names`` replaced by its rank-``keep`` SVD, and
    the summed loss proxies of the replacement (scalar and per-output gradient energy)."""
    student = copy.deepcopy(teacher)
    scalar = rows = 0.0
    for name in names:
        module, layer = student.get_submodule(name), stats[name]
        weight, kind = dense_weight_of(module)
        m, n = weight.shape
        rank = max(1, round(keep * m * n / (m + n)))
        factors = truncated_svd(weight, rank, layer.input_cov, row_weights=layer.grad_sq_rows if weighted else None)
        d = weight.double() - factors.to_dense().double()
        per_output = (d @ layer.input_cov.double() * d).sum(1)  # E[(delta y_i)^2]
        scalar += 0.5 * layer.grad_sq * float(per_output.sum())
        rows += 0.5 * float(layer.grad_sq_rows @ per_output)
        set_module(student, name, LowRankLinear.from_factors(factors, bias_of(module), kind))
    return student, {"loss_proxy_scalar": scalar, "loss_proxy_rows": rows}


def scores(model, teacher, eval_sets: dict, context: int) -> dict:
    return {
        Path(name).name: {k: m.get(k) for k in ("perplexity", "kl_to_teacher", "top1_agreement")}
        for name, m in evaluate_domains(model, teacher, eval_sets, context)["domains"].items()
    }


def format_table(result: dict) -> str:
    domains = list(result["teacher"])
    rows = [["teacher", "", result["teacher"][domains[0]]["perplexity"], "", "", "", "", ""]]
    for p in result["points"]:
        rows.append(
            [p["variant"], p["keep"], p[domains[0]]["perplexity"], p[domains[0]]["kl_to_teacher"]]
            + [p[domains[1]]["perplexity"], p[domains[1]]["kl_to_teacher"]]
            + [p["loss_proxy_scalar"], p["loss_proxy_rows"]]
        )
    heads = ["fit", "keep", f"ppl ({domains[0]})", "KL", f"ppl ({domains[1]})", "KL", "proxy (scalar)", "proxy (rows)"]
    return table(heads, rows)


if __name__ == "__main__":
    main()
