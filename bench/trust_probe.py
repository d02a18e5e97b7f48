"""Replays the adversarial probes of issues #40 and #49 against the real ``tqc`` command and counts what goes wrong.

Each case runs ``tqc`` in a fresh process on tiny models made here (GPT-2, a tied Llama, a Mixtral
MoE), with one thing broken: a user's folder as ``--out``, a copy of an output holding a user's file,
an output that is its input, an edited or sharded model dir, a full disk (a small tmpfs, where this
machine lets root mount one), a second writer, a non-finite or out-of-range number, a bad spec file,
and so on. A case fails in one of these ways, which the result file counts:

- data loss: a file the tool did not write changed or vanished, or an output lost a file it had;
- code from a dir: anything named in a model dir was imported and run;
- hang: no answer within --timeout seconds;
- traceback: a refusal that is not one ``error:`` line with exit status 2 (or a crash);
- silent wrong result: exit 0 where the input had to be refused;
- wrong blame: a refusal whose line does not name the option or file that was wrong;
- debris: a partial output, scratch folder or lock file left beside the output.

    python bench/trust_probe.py              # ~4 minutes on 2 cores; writes bench/results/trust_probe/trust-probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import HERE
from provenance import cpu_run, git_commit

TQC = [sys.executable, "-c", "from tqcompressor.cli import main; main()"]
ZEN = "Beautiful is better than ugly"


@dataclass
class Case:
    name: str
    args: list[str]
    refuse: bool = True  # the input must be refused (exit 2, one line); False: it must work (exit 0)
    keep: list[Path] = field(default_factory=list)  # files and dirs that must come out byte for byte unchanged
    env: dict = field(default_factory=dict)
    names: str | None = None  # what the refusal's line must name (the option or file at fault)
    clean: Path | None = None  # a folder that must hold nothing new afterwards (no partial output, scratch or lock)
    held: Path | None = None  # an output another process holds the writer lock on while the case runs


def snapshot(paths: list[Path]) -> dict[str, bytes | None]:
    state = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            state[str(file)] = file.read_bytes() if file.exists() else None
    return state


def run_case(case: Case, timeout: float) -> dict:
    before = snapshot(case.keep)
    present = set(case.clean.iterdir()) if case.clean is not None else set()
    holder = None
    if case.held is not None:
        from tests.conftest import HOLDER  # the test suite's lock holder

        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(case.held)], stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
    started = time.perf_counter()
    try:
        result = subprocess.run(
            TQC + case.args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **case.env}
        )
    except subprocess.TimeoutExpired:
        return {"name": case.name, "failure": "hang", "seconds": timeout}
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    seconds = time.perf_counter() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    record = {"name": case.name, "exit": result.returncode, "seconds": round(seconds, 1), "line": errors[:1]}
    if ZEN in result.stdout + result.stderr:
        record["failure"] = "code from a dir"
    elif snapshot(case.keep) != before:
        record["failure"] = "data loss"
    elif "Traceback" in result.stderr or (case.refuse and result.returncode not in (0, 2)):
        record["failure"] = "traceback"
    elif case.refuse and result.returncode == 0:
        record["failure"] = "silent wrong result"
    elif case.refuse and len(errors) != 1:
        record["failure"] = "traceback"
    elif not case.refuse and result.returncode != 0:
        record["failure"] = "refused a good input"
    elif case.names is not None and case.names not in errors[0]:
        record["failure"] = "wrong blame"
    elif case.clean is not None and (new := sorted(p.name for p in set(case.clean.iterdir()) - present)):
        record.update(failure="debris", left=new)
    return record


# -- the models and dirs the cases break -----------------------------------------------------------------


def make_models(work: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(HERE.parent))
    from tests.conftest import make_tokenizer, tiny_llama  # the test suite's toy tokenizer

    tokenizer = make_tokenizer()
    paths = {}
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=128))
    for name, model in (("gpt2", gpt2), ("llama", tiny_llama(vocab_size=len(tokenizer)))):
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
        paths[name] = work / name
    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "moe")
    tokenizer.save_pretrained(work / "moe")
    paths["moe"] = work / "moe"
    text = work / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . " * 400)
    paths["text"] = text
    return paths


def tqc(*args: str) -> None:
    subprocess.run(TQC + list(args), check=True, capture_output=True)


def edited_copy(source: Path, target: Path, file: str, edit) -> Path:
    shutil.copytree(source, target)
    data = json.loads((target / file).read_text())
    edit(data)
    (target / file).write_text(json.dumps(data))
    return target


def cases(work: Path, m: dict[str, Path]) -> list[Case]:
    from safetensors.torch import load_file, save_file

    out = lambda name: str(work / "out" / name)  # noqa: E731
    gpt2, llama, text = str(m["gpt2"]), str(m["llama"]), str(m["text"])
    compressed, tied = work / "compressed", work / "tied"
    tqc("compress", "--model", gpt2, "--method", "svd", "--ratio", "0.7", "--out", str(compressed))
    tqc("compress", "--model", llama, "--method", "svd", "--ratio", "0.8", "--out", str(tied))
    moe_dir = work / "moe-compressed"
    tqc("compress", "--model", str(m["moe"]), "--method", "svd", "--ratio", "0.8", "--out", str(moe_dir))
    found = []

    # data loss
    resdir = work / "resdir"
    resdir.mkdir()
    (resdir / "results.json").write_text("{}")
    (resdir / "thesis.txt").write_text("years of work")
    found += [
        Case(
            "compress into a user's dir holding results.json",
            ["compress", "--model", gpt2, "--out", str(resdir)],
            keep=[resdir],
        ),
        Case(
            "run into a user's dir holding results.json",
            ["run", "--model", gpt2, "--data", text, "--out", str(resdir)],
            keep=[resdir],
        ),
        Case(
            "export --dense onto its own input",
            ["export", str(compressed), "--dense", "--out", str(compressed)],
            keep=[compressed],
        ),
        Case(
            "quantize onto its own input",
            ["quantize", str(compressed), "--bits", "int8", "--out", str(compressed)],
            keep=[compressed],
        ),
        Case(
            "onnx export into its own input",
            ["export", str(compressed), "--onnx", "--out", str(compressed / "m.onnx")],
            keep=[compressed],
        ),
        Case(
            "quantize a compressed dir (keeps compression.json)",
            ["quantize", str(compressed), "--bits", "int8", "--out", out("q")],
            refuse=False,
        ),
    ]
    # code from a dir
    zen = edited_copy(
        moe_dir,
        work / "zen",
        "tqcompressor.json",
        lambda s: [d.update(fused_class="this.s") for d in s["modules"].values() if d["type"] == "LinearExperts"],
    )
    found.append(
        Case(
            "fused_class 'this.s' in a MoE dir, export --dense",
            ["export", str(zen), "--dense", "--out", out("zen-dense")],
            refuse=False,
        )
    )
    # silent wrong results
    missing = work / "missing-weights"
    shutil.copytree(tied, missing)
    tensors = load_file(str(missing / "model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k},
        str(missing / "model.safetensors"),
        metadata={"format": "pt"},
    )
    layers2000 = edited_copy(compressed, work / "layers2000", "config.json", lambda c: c.update(n_layer=2000))
    plain2000 = edited_copy(m["llama"], work / "plain2000", "config.json", lambda c: c.update(num_hidden_layers=2000))
    found += [
        Case("tied embedding, two weights deleted: eval", ["eval", "--model", str(missing), "--data", text]),
        Case("num_hidden_layers 2000 in a compressed dir: eval", ["eval", "--model", str(layers2000), "--data", text]),
        Case("num_hidden_layers 2000 in a plain dir: eval", ["eval", "--model", str(plain2000), "--data", text]),
        Case("eval --max-tokens 0", ["eval", "--model", gpt2, "--data", text, "--max-tokens", "0"]),
        Case("eval --max-tokens -1", ["eval", "--model", gpt2, "--data", text, "--max-tokens", "-1"]),
        Case("run --eval-tokens 0", ["run", "--model", gpt2, "--data", text, "--eval-tokens", "0", "--out", out("r0")]),
        Case(
            "compress --calibration-tokens 0",
            [
                "compress",
                "--model",
                gpt2,
                "--method",
                "auto",
                "--calibration",
                text,
                "--calibration-tokens",
                "0",
                "--out",
                out("c0"),
            ],
        ),
        Case(
            "compress --calibration-tokens -100",
            ["compress", "--model", gpt2, "--calibration", text, "--calibration-tokens", "-100", "--out", out("c1")],
        ),
        Case(
            "--spec with --ratio",
            [
                "compress",
                "--model",
                gpt2,
                "--spec",
                str(spec(work, "ok.yaml", {})),
                "--ratio",
                "0.5",
                "--out",
                out("s0"),
            ],
        ),
    ]
    for option in ("--lr", "--temperature", "--alpha-blocks"):
        found.append(
            Case(
                f"distill {option} inf",
                [
                    "distill",
                    "--teacher",
                    gpt2,
                    "--student",
                    str(compressed),
                    "--data",
                    text,
                    option,
                    "inf",
                    "--out",
                    out("d" + option),
                ],
            )
        )
    for key, value in (
        ("layers", []),
        ("row_scale", "no"),
        ("rank", "abc"),
        ("rank", float("nan")),
        ("rank", 4.7),
        ("step", float("inf")),
        ("b_shape", [2, 2, 2]),
    ):
        path = spec(work, f"{key}-{value}.yaml", {key: value})
        found.append(
            Case(f"spec {key}: {value}", ["compress", "--model", gpt2, "--spec", str(path), "--out", out("s")])
        )
    upper = spec(work, "upper.YAML", {})
    found.append(
        Case(
            "a .YAML spec is read as YAML",
            ["compress", "--model", gpt2, "--spec", str(upper), "--out", out("upper")],
            refuse=False,
        )
    )
    # hangs
    experts = edited_copy(moe_dir, work / "experts1e8", "config.json", lambda c: c.update(num_local_experts=10**8))
    experts_structure = edited_copy(
        moe_dir,
        work / "experts1e8-structure",
        "tqcompressor.json",
        lambda s: [d.update(num_experts=10**8) for d in s["modules"].values() if d["type"] == "LinearExperts"],
    )
    rank = edited_copy(
        compressed,
        work / "rank1e8",
        "tqcompressor.json",
        lambda s: next(d for d in s["modules"].values() if "rank" in d).update(rank=10**8),
    )
    for name, path in (
        ("num_experts 1e8 in config.json", experts),
        ("num_experts 1e8 in tqcompressor.json", experts_structure),
        ("rank 1e8", rank),
    ):
        found += [
            Case(f"{name}: eval", ["eval", "--model", str(path), "--data", text]),
            Case(f"{name}: quantize", ["quantize", str(path), "--bits", "int8", "--out", out("q-" + path.name)]),
            Case(f"{name}: export --dense", ["export", str(path), "--dense", "--out", out("e-" + path.name)]),
        ]
    found += [
        Case(
            "--calibration-tokens 1e12",
            [
                "compress",
                "--model",
                gpt2,
                "--calibration",
                text,
                "--calibration-tokens",
                "1000000000000",
                "--out",
                out("cal"),
            ],
        ),
        Case(
            "distill --batch-size 1e9",
            [
                "distill",
                "--teacher",
                gpt2,
                "--student",
                str(compressed),
                "--data",
                text,
                "--batch-size",
                "1000000000",
                "--out",
                out("bs"),
            ],
        ),
    ]
    # tracebacks
    binary = work / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    (work / "afile.txt").write_text("x")
    found += [
        Case("--model DIR/config.json", ["eval", "--model", f"{gpt2}/config.json", "--data", text]),
        Case("--out afile.txt/sub", ["compress", "--model", gpt2, "--out", str(work / "afile.txt" / "sub")]),
        Case("a 300-character --out", ["compress", "--model", gpt2, "--out", str(work / ("x" * 300))]),
        Case(
            "--seed 10^24",
            [
                "distill",
                "--teacher",
                gpt2,
                "--student",
                str(compressed),
                "--data",
                text,
                "--seed",
                "1" + "0" * 24,
                "--out",
                out("seed"),
            ],
        ),
        Case("run --context 0", ["run", "--model", gpt2, "--data", text, "--context", "0", "--out", out("ctx")]),
        Case("eval --batch-size 0", ["eval", "--model", gpt2, "--data", text, "--batch-size", "0"]),
        Case("eval --json on a directory", ["eval", "--model", gpt2, "--data", text, "--json", str(work)]),
        Case(
            "eval --json in a missing dir",
            ["eval", "--model", gpt2, "--data", text, "--json", str(work / "no" / "m.json")],
        ),
        Case("lambada: a missing file", ["eval", "--model", gpt2, "--data", f"lambada:{work / 'nope.txt'}"]),
        Case("lambada: a binary file", ["eval", "--model", gpt2, "--data", f"lambada:{binary}"]),
        Case("push offline", ["push", str(compressed), "--repo", "user/name"], env={"HF_HUB_OFFLINE": "1"}),
        Case("a typo'd option", ["compress", "--modle", gpt2, "--out", out("typo")]),
        Case("a missing option", ["compress", "--model", gpt2]),
    ]
    edits = {
        "config.json": [
            ("bad JSON", None),
            ("missing model_type", lambda c: c.pop("model_type")),
            ("dtype bogus", lambda c: c.update(dtype="bogus")),
            ("n_embd negative", lambda c: c.update(n_embd=-64)),
            ("unknown activation", lambda c: c.update(activation_function="bogus")),
        ],
        "tqcompressor.json": [
            ("bad JSON", None),
            ("modules a list", lambda s: s.update(modules=[])),
            ("dtype bogus", lambda s: s.update(dtype="bogus")),
            ("missing rank", lambda s: [d.pop("rank", None) for d in s["modules"].values()]),
            ("negative shapes", lambda s: [d.update(in_features=-4) for d in s["modules"].values()]),
        ],
        "compression.json": [("bad JSON", None), ("layers a map", lambda c: c.update(layers={}))],
    }
    for file, changes in edits.items():
        for label, edit in changes:
            target = work / f"edit-{file}-{label}".replace(" ", "-")
            if edit is None:
                shutil.copytree(compressed, target)
                (target / file).write_text("{not json")
            else:
                edited_copy(compressed, target, file, edit)
            command = (
                ["info", str(target)]
                if file == "compression.json"
                else ["eval", "--model", str(target), "--data", text]
            )
            found.append(Case(f"{file}: {label}", command))
    return found + issue_49_cases(work, m, compressed, tied)


def issue_49_cases(work: Path, m: dict[str, Path], compressed: Path, tied: Path) -> list[Case]:
    """Issue #49's probe: ownership that does not travel, the ONNX writers, counts and shards, a full
    disk, and options that were accepted silently or refused with the wrong name."""
    from tests.conftest import shard_weights  # the test suite's own (make_models put the repo on the path)

    gpt2, text = str(m["gpt2"]), str(m["text"])
    out = lambda name: str(work / "out" / name)  # noqa: E731
    copy = work / "copy"
    shutil.copytree(compressed, copy)
    (copy / "notes.txt").write_text("my thesis")
    genai_target = work / "another-compressed"
    tqc("quantize", str(compressed), "--bits", "int8", "--out", str(genai_target))
    side = work / "side"  # a folder where nothing but the named output may appear
    side.mkdir()
    found = [
        Case("compress into a copy holding notes.txt", ["compress", "--model", gpt2, "--out", str(copy)], keep=[copy]),
        Case(
            "quantize into that copy", ["quantize", str(compressed), "--bits", "int8", "--out", str(copy)], keep=[copy]
        ),
        Case("export --dense into that copy", ["export", str(compressed), "--dense", "--out", str(copy)], keep=[copy]),
        Case(
            "export --dense --adopt into that copy",
            ["export", str(compressed), "--dense", "--out", str(copy), "--adopt"],
            keep=[copy],
            names="notes.txt",
        ),
        Case("run into that copy", ["run", "--model", gpt2, "--data", text, "--out", str(copy)], keep=[copy]),
        Case(
            "distill into that copy",
            ["distill", "--teacher", gpt2, "--student", str(compressed), "--data", text, "--out", str(copy)],
            keep=[copy],
        ),
        Case(
            "--genai into another compressed dir",
            ["export", str(compressed), "--onnx", "--genai", "--out", str(genai_target)],
            keep=[genai_target],
            clean=work,
        ),
        Case(
            "--onnx while another writer holds the same file",
            ["export", str(compressed), "--onnx", "--out", str(side / "held.onnx")],
            held=side / "held.onnx",
            names="pid",
            clean=side,
        ),
        Case(
            "--onnx over a user's file",
            ["export", str(compressed), "--onnx", "--out", str(side / "theirs.onnx")],
            keep=[side],
            names="theirs.onnx",
            clean=side,
        ),
        Case(
            "--onnx into a new file",
            ["export", str(compressed), "--onnx", "--no-cache", "--out", str(side / "m.onnx")],
            refuse=False,
        ),
        Case(
            "eval --json while another writer holds it",
            ["eval", "--model", gpt2, "--data", text, "--context", "16", "--json", str(side / "e.json")],
            held=side / "e.json",
            names="pid",
        ),
    ]
    (side / "theirs.onnx").write_text("not ours")
    huge = edited_copy(tied, work / "layers1e8", "config.json", lambda c: c.update(num_hidden_layers=10**8))
    add_tensor(huge, "model.layers.99999999.x")
    sharded, incomplete = work / "sharded", work / "sharded-incomplete"
    shutil.copytree(tied, sharded)
    shard_weights(sharded)
    shutil.copytree(tied, incomplete)
    shard_weights(incomplete, drop="self_attn.q_proj.")
    blank, twice = work / "blank.txt", work / "specs" / "twice.yaml"
    blank.write_text(" \n\t\n   \n")
    entry = "  - modules: [transformer.h.1.mlp.c_fc]\n    method: svd\n    rank: 2\n"
    twice.write_text("layers:\n" + entry + entry)
    found += [
        Case("1e8 layers, one tensor numbered 99999999: eval", ["eval", "--model", str(huge), "--data", text]),
        Case(
            "1e8 layers, one tensor numbered 99999999: export --dense",
            ["export", str(huge), "--dense", "--out", out("h")],
        ),
        Case("1e8 layers, one tensor numbered 99999999: info", ["info", str(huge)], names="layers"),
        Case(
            "a complete sharded dir: eval",
            ["eval", "--model", str(sharded), "--data", text, "--context", "16"],
            refuse=False,
        ),
        Case("a sharded dir missing a factored tensor: eval", ["eval", "--model", str(incomplete), "--data", text]),
        Case("--method ''", ["compress", "--model", gpt2, "--method", "", "--out", out("m0")], names="method"),
        Case("compress --steps 0", ["compress", "--model", gpt2, "--steps", "0", "--out", out("st0")], names="--steps"),
        Case(
            "--ratio beside --target-params",
            ["compress", "--model", gpt2, "--ratio", "0.5", "--target-params", "50000", "--out", out("rt")],
            names="--target-params",
        ),
        Case(
            "--group-size 7 without --quantize",
            ["compress", "--model", gpt2, "--group-size", "7", "--out", out("g7")],
            names="--group-size",
        ),
        Case(
            "quantize int8 --group-size 64",
            ["quantize", gpt2, "--bits", "int8", "--group-size", "64", "--out", out("q64")],
            names="--group-size",
        ),
        Case("eval --data of a whitespace file", ["eval", "--model", gpt2, "--data", str(blank), "--context", "16"]),
        Case(
            "a module listed twice in a spec", ["compress", "--model", gpt2, "--spec", str(twice), "--out", out("tw")]
        ),
        Case("run --stages 0", ["run", "--model", gpt2, "--stages", "0", "--out", out("s0")], names="--stages"),
        Case(
            "eval --context 1000000",
            ["eval", "--model", gpt2, "--data", text, "--context", "1000000"],
            names="--context",
        ),
    ]
    return found + full_disk_cases(work, m, compressed)


def full_disk_cases(work: Path, m: dict[str, Path], compressed: Path) -> list[Case]:
    """Writers on a 96 KiB tmpfs, where this machine lets root mount one (none of these outputs fits)."""
    disk = work / "full"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True).returncode:
        print("no tmpfs could be mounted here: the full-disk cases are left out", flush=True)
        return []
    gpt2, text = str(m["gpt2"]), str(m["text"])
    distill = ["distill", "--teacher", gpt2, "--student", str(compressed), "--data", text, "--steps", "2"]
    distill += ["--seq-len", "16", "--batch-size", "1", "--checkpoint-every", "1", "--out", str(disk / "run")]
    return [
        Case(
            "full disk: export --dense",
            ["export", str(compressed), "--dense", "--out", str(disk / "d")],
            names="space",
            clean=disk,
        ),
        Case(
            "full disk: --genai",
            ["export", str(compressed), "--onnx", "--genai", "--out", str(disk / "g")],
            names="space",
            clean=disk,
        ),
        Case(
            "full disk: --onnx",
            ["export", str(compressed), "--onnx", "--out", str(disk / "m.onnx")],
            names="space",
            clean=disk,
        ),
        Case("full disk: distill", distill, names="space"),
    ]


def add_tensor(directory: Path, name: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    tensors[name] = torch.zeros(1)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def spec(work: Path, name: str, change: dict) -> Path:
    entry = {"modules": ["transformer.h.1.mlp.c_fc"], "method": "tq", "rank": 2, "b_shape": [4, 2], "step": 1}
    data = {"layers": []} if change.get("layers") == [] else {"layers": [entry | change]}
    path = work / "specs" / name
    path.parent.mkdir(exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "trust_probe" / "trust-probe.json")
    args = parser.parse_args()
    commit = git_commit()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "out").mkdir()
        try:
            probes = cases(work, make_models(work))
            records = []
            for case in probes:
                record = run_case(case, args.timeout)
                records.append(record)
                print(f"{record.get('failure', 'ok'):>22}  {record.get('seconds', ''):>6}  {case.name}", flush=True)
        finally:
            subprocess.run(["umount", str(work / "full")], capture_output=True)
    kinds = (
        "data loss",
        "code from a dir",
        "hang",
        "traceback",
        "silent wrong result",
        "refused a good input",
        "wrong blame",
        "debris",
    )
    summary = {kind: sum(r.get("failure") == kind for r in records) for kind in kinds}
    result = {
        **cpu_run(commit, args),
        "what": "issues #40 and #49's probes replayed: each case one `tqc` process on tiny models, one thing broken",
        "cases": len(records),
        "failures": summary,
        "slowest_refusal_seconds": max(r.get("seconds", 0) for r in records if r.get("exit") == 2),
        "records": records,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(records)} cases: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
