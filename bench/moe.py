"""Compressing a mixture-of-experts model: a tiny Qwen3-MoE trained here, its experts factored.

No MoE checkpoint is at hand offline, so the run first trains one: a byte-level BPE tokenizer
(--vocab) and a Qwen3-MoE of a few million parameters (8 experts, top-2, the experts holding most
of the weights) on WikiText-2 valid, with the load-balancing loss, for --train-steps; it reports
the teacher's WikiText-2 test perplexity and its routing (the entropy of the router's
distribution per token, and how evenly the experts are used). Then every method compresses it to
--ratio of its parameters, experts included (split by tqcompressor, no flag needed): `svd`, `tq`,
`kronecker` (weights only), calibrated `svd_aware` and `auto` (calibration on --calibration-tokens
of valid); each is evaluated one-shot and after the same short distillation (--kd-steps).

The shared-basis variant is measured against per-expert SVD at equal parameters on every expert
matrix of the teacher: one basis shared by the experts of a layer (their inputs' or their outputs'
side, whichever is better) plus a small per-expert factor, versus each expert's own truncated SVD;
relative weight error per matrix type, and one-shot perplexity with every expert replaced.

Writes bench/results/moe/moe.json and moe.png and prints tables.

    python bench/moe.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from common import DATA, HERE, Fidelity, before_after_bars, fidelity_options
from provenance import git_commit
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import tqcompressor as tqc
from tqcompressor.data import calibration_ids, text_block_source, tokenize_text
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.evaluation.report import table
from tqcompressor.surgery.experts import LinearExperts, split_experts
from tqcompressor.training.distill import DistillConfig, multistep_distill
from tqcompressor.versions import library_versions

METHODS = ["svd", "kronecker", "tq", "svd_aware", "auto"]
CALIBRATED = {"svd_aware": "svd", "auto": "auto"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default=str(DATA / "valid.txt"))
    parser.add_argument("--test", default=str(DATA / "test.txt"))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--train-lr", type=float, default=2e-3)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--kd-steps", type=int, default=150)
    parser.add_argument("--kd-lr", type=float, default=1e-3)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    fidelity_options(parser)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "moe" / "moe.json")
    parser.add_argument("--work", type=Path, default=Path("runs/moe"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    commit = git_commit()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    work = args.work / time.strftime("%Y%m%d-%H%M%S")  # fresh: distillation would resume what it finds
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(args.train, args.vocab)
    teacher, train_record = train_teacher(tokenizer, args)
    ids = tokenize_text(args.test, tokenizer, args.eval_tokens)
    eval_kwargs = dict(context=args.context, tokenizer=tokenizer, batch_size=16, progress=False)
    teacher_metrics = evaluate(teacher, ids, **eval_kwargs)
    suite = Fidelity(teacher, tokenizer, args.fidelity_tokens, args.context, work)
    result = {
        "commit": commit,
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("out", "work", "replot")},
        "versions": library_versions(),
        "device": "cpu",
        "cpu": {"cores": os.cpu_count(), "machine": platform.machine(), "threads": torch.get_num_threads()},
        "teacher": {
            "params": tqc.count_parameters(teacher),
            "expert_params": expert_params(teacher),
            "perplexity": teacher_metrics["perplexity"],
            **train_record,
            **routing(teacher, ids[: 64 * args.seq_len].reshape(-1, args.seq_len)),
        },
        "fidelity": suite.protocol(),
        "eval": {
            "data": Path(args.test).name,
            "in_domain": True,  # the teacher's own training corpus: ppl_* and kl_* of each method
            "tokens": teacher_metrics["tokens"],
            **teacher_metrics["protocol"],
        },
        "kd": {"steps": args.kd_steps, "tokens": args.kd_steps * args.batch_size * args.seq_len, "data": "valid.txt"},
        "counting": "every parameter counted once (tied embedding/head once)",
        "shared_basis": shared_basis_study(teacher, ids, eval_kwargs, args),
        "methods": {},
    }
    print(f"teacher: {result['teacher']['params']:,} params, ppl {teacher_metrics['perplexity']:.2f}", flush=True)
    calibration = calibration_ids(args.train, teacher, tokenizer, args.calibration_tokens, args.seq_len)
    blocks = text_block_source(args.train, tokenizer, args.seq_len)
    kd = DistillConfig(
        steps=args.kd_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.kd_lr,
        checkpoint_every=10**9,
        log_every=10,
    )
    for method in args.methods.split(","):
        begun = time.perf_counter()
        config = tqc.CompressionConfig(method=CALIBRATED.get(method, method), ratio=args.ratio)
        student, report = tqc.compress(
            copy.deepcopy(teacher), config, calibration=calibration if method in CALIBRATED else None, progress=False
        )
        one_shot = evaluate(student, ids, teacher=teacher, **eval_kwargs)
        fidelity_one_shot = suite.point(student)["fidelity_kl"]
        student = multistep_distill(teacher, student, blocks, kd, work / method, progress=False)
        distilled = evaluate(student.eval(), ids, teacher=teacher, **eval_kwargs)
        in_experts = [layer for layer in report.layers if ".experts." in layer.name]
        result["methods"][method] = {
            "params": tqc.count_parameters(student),
            "expert_params": expert_params(student),
            "expert_layers_factored": len(in_experts),
            "expert_methods": sorted({layer.method for layer in in_experts}),
            **suite.point(student),
            "fidelity_kl_one_shot": fidelity_one_shot,
            "ppl_one_shot": one_shot["perplexity"],
            "kl_one_shot": one_shot["kl_to_teacher"],
            "ppl_distilled": distilled["perplexity"],
            "kl_distilled": distilled["kl_to_teacher"],
            "top1_distilled": distilled["top1_agreement"],
            "seconds": time.perf_counter() - begun,
        }
        print(method, json.dumps(result["methods"][method]), flush=True)
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print_tables(result)
    print(f"wrote {args.out}")


def train_tokenizer(path: str, vocab: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the training text (a small vocabulary keeps the
    embedding small, so the experts hold most of the model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train([path], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def train_teacher(tokenizer, args) -> tuple[torch.nn.Module, dict]:
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        intermediate_size=args.expert_width,
        moe_intermediate_size=args.expert_width,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        output_router_logits=True,  # the load-balancing loss, so that every expert is trained
        router_aux_loss_coef=0.01,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.train_lr, weight_decay=0.1, betas=(0.9, 0.95))
    blocks = text_block_source(args.train, tokenizer, args.seq_len)(0)
    losses = []
    model.train()
    for step in range(args.train_steps):
        lr = args.train_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.train_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.stack([next(blocks) for _ in range(args.batch_size)])
        loss = model(batch, labels=batch).loss  # LM loss + router_aux_loss_coef * load-balancing loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"train step {step}: loss {loss.item():.3f}", flush=True)
    model.config.output_router_logits = False
    record = {
        "train_steps": args.train_steps,
        "train_tokens": args.train_steps * args.batch_size * args.seq_len,
        "train_loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "architecture": "qwen3_moe",
        "experts": args.experts,
        "top_k": args.top_k,
    }
    return model.eval(), record


@torch.no_grad()
def routing(model, blocks: torch.Tensor) -> dict:
    """Mean entropy (nats) of the router's distribution per token, and the entropy of the experts'
    share of routed tokens per layer (log(experts) when perfectly balanced)."""
    out = model(blocks, output_router_logits=True)
    per_token, usage = [], []
    for logits in out.router_logits:
        probs = logits.float().softmax(-1)
        per_token.append(float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()))
        chosen = probs.topk(model.config.num_experts_per_tok, dim=-1).indices.reshape(-1)
        share = torch.bincount(chosen, minlength=probs.shape[-1]).float()
        share = share / share.sum()
        usage.append(float(-(share * share.clamp_min(1e-12).log()).sum()))
    return {
        "router_entropy_per_token": sum(per_token) / len(per_token),
        "expert_usage_entropy_per_layer": usage,
        "max_entropy": math.log(model.config.num_experts),
    }


def expert_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)


def shared_basis_study(teacher, ids, eval_kwargs, args) -> dict:
    """Per-expert SVD vs one basis shared by a layer's experts, at equal parameters, on every
    expert matrix; errors per matrix type and one-shot perplexity with every expert replaced."""
    model = copy.deepcopy(teacher)
    split_experts(model)
    layers = [m for m in model.modules() if isinstance(m, LinearExperts)]
    errors: dict[str, dict[str, list[float]]] = {}
    variants = {"per_expert_svd": copy.deepcopy(model), "shared_basis": copy.deepcopy(model)}
    for name in ("gate_up", "down"):
        weights = [torch.stack([linear.weight.detach() for linear in getattr(layer, name)]) for layer in layers]
        stacked = weights[0]
        experts, rows, cols = stacked.shape
        budget = int(args.ratio * experts * rows * cols)  # parameters for one layer's experts of this type
        rank = max(1, budget // (experts * (rows + cols)))
        results = {"per_expert_svd": [], "shared_basis": []}
        for index, w in enumerate(weights):
            own = per_expert_svd(w, rank)
            shared, side, shared_rank = best_shared(w, budget)
            for variant, approx in (("per_expert_svd", own), ("shared_basis", shared)):
                results[variant].append(float((w - approx).norm() / w.norm()))
                target = [m for m in variants[variant].modules() if isinstance(m, LinearExperts)][index]
                with torch.no_grad():
                    for e, linear in enumerate(getattr(target, name)):
                        linear.weight.copy_(approx[e])
        errors[name] = {
            "per_expert_rank": rank,
            "shared_side": side,
            "shared_rank": shared_rank,
            "params_per_layer": budget,
            **{f"{variant}_error": values for variant, values in results.items()},
        }
    one_shot = {variant: evaluate(m, ids, teacher=teacher, **eval_kwargs) for variant, m in variants.items()}
    return {
        "matrices": errors,
        "one_shot": {v: {"perplexity": m["perplexity"], "kl": m["kl_to_teacher"]} for v, m in one_shot.items()},
        "note": "weight-space fits at --ratio of each layer's expert parameters; the rest of the model untouched",
    }


def per_expert_svd(w: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank] @ vh[..., :rank, :]).to(w.dtype)


def best_shared(w: torch.Tensor, budget: int) -> tuple[torch.Tensor, str, int]:
    """The better of a shared input basis (``W_e ~= (W_e V^T) V``, V: rank x cols, shared) and a
    shared output basis (``W_e ~= U (U^T W_e)``), each at the largest rank within ``budget``."""
    experts, rows, cols = w.shape
    best = None
    for side in ("inputs", "outputs"):
        matrix = w.reshape(experts * rows, cols) if side == "inputs" else w.transpose(1, 2).reshape(-1, rows)
        shared_dim = cols if side == "inputs" else rows
        own_dim = rows if side == "inputs" else cols
        rank = min(budget // (shared_dim + experts * own_dim), shared_dim)
        if rank < 1:
            continue
        basis = torch.linalg.svd(matrix.double(), full_matrices=False).Vh[:rank]  # rank x shared_dim
        if side == "inputs":
            approx = (w.double() @ basis.T) @ basis
        else:
            approx = basis.T @ (basis @ w.double())
        error = float((w.double() - approx).norm())
        if best is None or error < best[0]:
            best = (error, approx.to(w.dtype), side, rank)
    return best[1], best[2], best[3]


def print_tables(result: dict) -> None:
    teacher = result["teacher"]
    print(
        f"teacher: {teacher['params']:,} params ({teacher['expert_params']:,} in experts), ppl "
        f"{teacher['perplexity']:.2f}, router entropy {teacher['router_entropy_per_token']:.2f} of "
        f"{teacher['max_entropy']:.2f} nats per token"
    )
    rows = [
        [m, r["params"], r["expert_params"]]
        + [r.get("fidelity_kl_one_shot", ""), r.get("fidelity_kl", ""), r.get("fidelity_top1", "")]
        + [r["ppl_one_shot"], r["ppl_distilled"], r["kl_distilled"]]
        for m, r in result["methods"].items()
    ]
    fidelity = ["fidelity KL one-shot", "fidelity KL after KD", "fidelity top-1 after KD"]
    in_domain = ["ppl one-shot (in-domain)", "ppl after KD (in-domain)", "KL after KD (in-domain)"]
    print(table(["method", "params", "in experts", *fidelity, *in_domain], rows))
    study = result["shared_basis"]
    rows = [
        [
            name,
            m["per_expert_rank"],
            f"{m['shared_side']} r{m['shared_rank']}",
            sum(m["per_expert_svd_error"]) / len(m["per_expert_svd_error"]),
            sum(m["shared_basis_error"]) / len(m["shared_basis_error"]),
        ]
        for name, m in study["matrices"].items()
    ]
    print(table(["matrices", "per-expert rank", "shared basis", "per-expert error", "shared error"], rows))
    print({v: round(m["perplexity"], 2) for v, m in study["one_shot"].items()})


def plot(result: dict, path: Path) -> None:
    """Fidelity KL per method, one-shot and after KD (log scale); for a file from before the fidelity
    suite, in-domain perplexity with the teacher's as a line."""
    methods, teacher = result["methods"], result["teacher"]
    title = (
        f"Tiny Qwen3-MoE ({teacher['experts']} experts, top-{teacher['top_k']}, {teacher['params'] / 1e6:.1f}M) "
        f"at {float(result['settings']['ratio']):.0%}"
    )
    if all("fidelity_kl" in r for r in methods.values()):
        before_after_bars(
            path,
            {m: (r["fidelity_kl_one_shot"], r["fidelity_kl"]) for m, r in methods.items()},
            [f"{m}\n{r['params'] / 1e6:.2f}M" for m, r in methods.items()],
            None,
            title,
            "one-shot",
            ylabel="fidelity KL to the teacher, held out (nats/token, log)",
        )
        return
    before_after_bars(
        path,
        {m: (r["ppl_one_shot"], r["ppl_distilled"]) for m, r in methods.items()},
        [f"{m}\n{r['params'] / 1e6:.2f}M" for m, r in methods.items()],
        (teacher["perplexity"], f"teacher {teacher['perplexity']:.1f}"),
        title,
        "one-shot",
    )


if __name__ == "__main__":
    main()
