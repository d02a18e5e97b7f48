"""Plain-text tables for the terminal and report files."""

from __future__ import annotations

from pathlib import Path

from tqcompressor.evaluation.fidelity import TEACHER_DOMAIN
from tqcompressor.structures import REGISTRY


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown-compatible table (reads fine in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return "" if value is None else str(value)


def format_quantization_table(result: dict) -> str:
    """The layers of a ``quantization.json``: format, stored weights, bytes before and after, error."""
    rows = [
        [
            layer["name"],
            layer["kind"],
            layer.get("format") or result["format"],
            layer["weights"],
            layer["float_bytes"] / 2**20,
            layer["stored_bytes"] / 2**20,
            layer["error"],
        ]
        for layer in result["layers"]
    ]
    text = table(["layer", "kind", "format", "weights", "float MiB", "stored MiB", "rel. error"], rows, "lllrrrr")
    text += (
        f"\n{len(rows)} layers in {result['format']}: {result['quantized_float_bytes'] / 2**20:.1f} MiB -> "
        f"{result['quantized_stored_bytes'] / 2**20:.1f} MiB; weights file {result['weights_file_bytes']:,} bytes"
    )
    if "kept_bytes" in result:  # written since the sum was checked (older files lack it)
        text += (
            f"\n{result['quantized_stored_bytes']:,} bytes of quantized layers + {result['kept_bytes']:,} kept as they "
            f"are (norms, biases, index buffers) = {result['quantized_stored_bytes'] + result['kept_bytes']:,}; "
            f"the weights file's tensors: {result['weights_tensor_bytes']:,}"
        )
    return text


def format_compression_table(report: dict) -> str:
    rows = [
        [
            entry["name"],
            entry["shape"],
            entry["method"],
            _settings_text(_layer_settings(entry)),
            entry["step"],
            entry["params_before"],
            entry["params_after"],
            entry["relative_error"],
            entry["seconds"],
        ]
        for entry in report["layers"]
    ]
    body = (
        table(
            ["layer", "shape", "method", "settings", "step", "params before", "params after", "rel. error", "seconds"],
            rows,
            "llllrrrrr",
        )
        if rows
        else "(no layer compressed)"
    )
    if report.get("auto"):
        body += "\n\n" + format_auto_table(report["auto"])
    original = report.get("original_params") or report["params_before"]
    step = f"step {report['step']}: " if report.get("step") is not None else ""
    budget = f", budget {report['target_params']:,}" if report.get("target_params") else ""
    total = (
        f"{step}total: {report['params_before']:,} -> {report['params_after']:,} parameters "
        f"({report['params_after'] / max(original, 1):.1%} of the original {original:,}{budget}), "
        f"{report['seconds']:.1f} s; counting: {report.get('counting', '')}"
    )
    return body + "\n" + total


def format_auto_table(auto: dict) -> str:
    """method="auto": per layer, what was chosen and the best alternatives of each kind."""
    rows = []
    for name, entry in auto.items():
        chosen = entry["chosen"]
        best = {}
        for c in entry["menu"]:  # the best candidate of each method at no more parameters than chosen
            if c["params"] <= chosen["params"] and (c["method"] not in best or c["error"] < best[c["method"]]["error"]):
                best[c["method"]] = c
        others = ", ".join(f"{m} {c['error']:.3f}" for m, c in sorted(best.items()) if m != chosen["method"])
        rows.append([name, _describe(chosen), chosen["params"], chosen["error"], len(entry["menu"]), others])
    metrics = list(dict.fromkeys(entry.get("metric", "relative weight error") for entry in auto.values()))
    notes = ""
    for mark, metric in zip("*†", metrics[1:]):  # a tied embedding is measured in its own metric
        for row, entry in zip(rows, auto.values()):
            if entry.get("metric") == metric:
                row[0] += " " + mark
        notes += f"\n{mark} errors are the {metric}"
    return (
        f"auto, errors are the {metrics[0] if metrics else ''}:\n"
        + table(
            ["layer", "auto chose", "params", "rel. error", "menu size", "best other at <= params (rel. error)"],
            rows,
            "llrrrl",
        )
        + notes
    )


def _describe(c: dict) -> str:
    """A candidate or layer in a few characters, as its structure words it (e.g. ``tq B2x4 r3``)."""
    return REGISTRY[c["method"]].describe(c)


def _layer_settings(layer: dict) -> dict:
    """A layer's settings; compression.json files written before the structure registry kept
    rank and shapes as fields of the layer itself."""
    if "settings" in layer:
        return layer["settings"]
    return {k: layer[k] for k in ("rank", "a_shape", "b_shape") if layer.get(k) is not None}


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in settings.items())


# ---------------------------------------------------------------------------------------------
# The report.md of a `tqc run` (from its results.json)


def format_report(result: dict) -> str:
    points = result["points"]
    lines = [f"# tqcompressor run: {result['base_model']}, {_target_words(result)}", ""]
    if points and "fidelity_kl" in points[0]:
        lines += _fidelity_section(points, result.get("quantized", []))
        lines += ["![fidelity KL vs bytes](fidelity.png) ![in-domain perplexity vs parameters](perplexity.png)", ""]
    else:  # results written before the fidelity suite
        lines += [_legacy_table(points), "", "![perplexity vs parameters](perplexity.png)", ""]
    if "plan_cells" in result:
        lines += _plan_section(result["plan_cells"])
    if "continuations" in result:
        lines += _continuations_section(result["continuations"])
    if "footprint" in result:
        lines += _footprint_section(result["footprint"])
    if result.get("phase_seconds"):
        lines += _time_section(result["phase_seconds"], result.get("budget"))
    widest = max(points, key=_scored_tokens) if points else {}
    domains = list(widest.get("domains", {}))
    tokens = ", ".join(f"{widest['domains'][n]['tokens']:,} of {n}" for n in domains)
    protocol = widest.get("protocol", {})
    lines += [
        "## How this was measured",
        "",
        f"- Perplexity, KL(teacher || student) and top-1 agreement: token level, sliding window (context "
        f"{protocol.get('context')}, stride {protocol.get('stride')}), scored tokens: {tokens}"
        + _interim_words(points, widest)
        + ".",
        (
            f"- Held-out domains: {result.get('second_domain', '')}; and {HELDOUT_WORDS}. "
            "Fidelity KL is the mean KL over them; the evaluation text (--eval-data) is in-domain and not counted."
            if points and "fidelity_kl" in points[0]
            else f"- Second domain: {result.get('second_domain', '')}."  # results from before the fidelity suite
        ),
        f"- Distillation data: {result['data']}"
        + (
            f", {result['teacher_fraction']:.0%} of the blocks sampled from the teacher"
            if result.get("teacher_fraction")
            else ""
        )
        + f"; {result['kd_tokens_per_stage']:,} tokens per stage; calibration: the first "
        f"{result.get('calibration_tokens', 0):,} tokens of the same blocks.",
        f"- Compression: {_compression_words(result.get('compression', {}), result.get('calibration_tokens', 0))}."
        if not result.get("byte_plan")
        else f"- Compression: {_byte_plan_words(result)}.",
        f"- Training: {_precision_words(result.get('training_precision', 'no'))}; evaluation in fp32.",
        f"- Parameters: {result['counting']}.",
        f"- Wall time: {result['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _scored_tokens(point: dict) -> int:
    return sum(d.get("tokens", 0) for d in point.get("domains", {}).values())


def _interim_words(points: list[dict], widest: dict) -> str:
    """Which points were scored on fewer windows than the widest (the run's points during distillation)."""
    fewer = [p for p in points if _scored_tokens(p) < _scored_tokens(widest)]
    if not fewer:
        return ""
    labels = ", ".join(p["label"] for p in fewer)
    first = ", ".join(f"{d['tokens']:,}" for d in fewer[0]["domains"].values())
    return f"; {labels}: the first windows of each domain only ({first} tokens), to save time during the run"


RECOVERY_PHASES = ("refitting blocks", "distilling")


def _time_section(phases: list[dict], budget: dict | None) -> list[str]:
    """Where the run's wall time went, phase by phase, and the share spent recovering the teacher."""
    total = sum(p["seconds"] for p in phases)
    recovery = sum(p["seconds"] for p in phases if p["phase"].startswith(RECOVERY_PHASES))
    rows = [[p["phase"], p["seconds"], f"{p['seconds'] / total:.0%}"] for p in phases if p["seconds"] >= 0.5]
    lines = [
        "## Where the time went",
        "",
        f"{recovery / 60:.1f} of {total / 60:.1f} min went to recovering the teacher (block refits and distillation).",
        "",
        table(["phase", "seconds", "share"], rows, "lrr"),
        "",
    ]
    if budget:
        lines += [
            f"Time budget: {budget['budget'] / 60:g} min. {budget['spent_before_distillation'] / 60:.1f} min went "
            "before distillation; one distillation step took "
            f"{budget['seconds_per_step']:.1f} s, so {budget['steps_per_stage']} steps per stage fit beside the "
            f"{budget['reserved_after_distillation'] / 60:.1f} min kept for the evaluations, the quantized comparison "
            "and saving"
            + (
                f" (a quantized model's forward took {budget['quantized_forward_cost']:.1f}x the float teacher's here)."
                if "quantized_forward_cost" in budget  # runs before it was measured lack it
                else "."
            )
            + _pool_words(budget),
            "",
        ]
    return lines


def _pool_words(budget: dict) -> str:
    """How many teacher samples the budget's steps took, and what sampling those the pool lacked cost."""
    if not budget.get("teacher_blocks"):  # no teacher samples, or a run before the pool grew with its budget
        return ""
    grown = f", {budget['sampling_seconds']:.0f} s of them to sample more" if budget["sampling_seconds"] else ""
    return (
        f" The teacher's pool holds {budget['teacher_blocks']} samples for those steps (sampled in chunks, the first "
        f"for calibration{grown})."
    )


HELDOUT_WORDS = (
    "three real texts no step reads, shipped in tqcompressor/evaluation/heldout (prose of 1611, Python documentation, "
    "CPython source; licences in its README)"
)


def _fidelity_section(points: list[dict], quantized: list[dict]) -> list[str]:
    """The headline: how close each point is to the teacher on text no step saw, then the same per
    domain, then what quantizing the teacher (or the student) gives instead."""
    names = list(points[0]["domains"])
    held_out = [n for n in names if points[0]["domains"][n].get("held_out")]
    own = [n for n in names if not points[0]["domains"][n].get("held_out")]
    headers = ["model", "params", "scored tokens", "fidelity KL", "fidelity top-1"]
    headers += [f"KL ({_short(n)})" for n in held_out] + [f"ppl, in-domain ({_short(n)})" for n in own]
    rows = [
        [p["label"], p["params"], _scored_tokens(p), p["fidelity_kl"], p["fidelity_top1"]]
        + [p["domains"][n]["kl_to_teacher"] for n in held_out]
        + [p["domains"][n]["perplexity"] for n in own]
        for p in points
    ]
    detail = [
        [
            p["label"],
            _short(n),
            "held out" if d.get("held_out") else "in-domain",
            d["kl_to_teacher"],
            d["top1_agreement"],
            d["perplexity"],
            d.get("perplexity_ratio"),
        ]
        for p in points
        for n, d in p["domains"].items()
    ]
    lines = [
        "## Fidelity to the teacher, on text no step of the run read",
        "",
        table(headers, rows),
        "",
        "Per domain (perplexity ratio: the model's perplexity over the teacher's on the same windows):",
        "",
        table(["model", "domain", "", "KL", "top-1", "perplexity", "ratio"], detail, "lllrrrr"),
        "",
    ]
    if quantized:
        mib = 2**20
        q_rows = [
            [f"{q['model']} {q['format']}", q["params"], q["memory_bytes"] / mib, q["fidelity_kl"], q["fidelity_top1"]]
            for q in quantized
        ]
        lines += [
            "## What quantization alone gives (bytes held in memory, same windows)",
            "",
            table(["model", "params", "MiB", "fidelity KL", "fidelity top-1"], q_rows),
            "",
            _against_the_teacher_quantized(quantized),
            "",
        ]
    return lines


def _against_the_teacher_quantized(quantized: list[dict]) -> str:
    """Each form of the student beside the closest teacher quantized into no more bytes (in memory):
    what a user would pick instead of it."""
    mib = 2**20
    teachers = [q for q in quantized if q["model"] == "teacher"]
    rows = []
    for student in (q for q in quantized if q["model"] == "student"):
        fits = [t for t in teachers if t["memory_bytes"] <= student["memory_bytes"]]
        best = min(fits, key=lambda t: t["fidelity_kl"]) if fits else None
        rows.append(
            [f"student {student['format']}", student["memory_bytes"] / mib, student["fidelity_kl"]]
            + (
                [f"teacher {best['format']}", best["memory_bytes"] / mib, best["fidelity_kl"]]
                if best
                else ["none", None, None]
            )
        )
    headers = ["model", "MiB", "fidelity KL", "closest teacher in no more bytes", "MiB", "fidelity KL"]
    return "Each form of the student against the teacher quantized into no more bytes:\n\n" + table(headers, rows)


def _legacy_table(points: list[dict]) -> str:
    domains = list(points[0]["domains"]) if points and "domains" in points[0] else []
    headers = ["model", "params"]
    for name in domains:
        headers += [f"ppl ({_short(name)})", f"KL ({_short(name)})", f"top-1 ({_short(name)})"]
    rows = [
        [p["label"], p["params"]]
        + [
            x
            for name in domains
            for x in (
                p["domains"][name]["perplexity"],
                p["domains"][name].get("kl_to_teacher"),
                p["domains"][name].get("top1_agreement"),
            )
        ]
        for p in points
    ]
    return table(headers, rows)


def _short(name: str) -> str:
    return name if name == TEACHER_DOMAIN or " (" in name else Path(name).name


def _target_words(result: dict) -> str:
    """What the run was asked for: a method and a ratio of the parameters, a size, or a fidelity."""
    found = f", saved in {result['bytes'] / 2**20:.1f} MiB" if result.get("bytes") else ""
    if result.get("max_kl") is not None:
        return f"the smallest model within fidelity KL {result['max_kl']:g} one-shot{found}"
    if not result.get("max_bytes"):
        return f"method {result['method']}, ratio {result['ratio']}"
    return f"within {result['max_bytes'] / 2**20:.1f} MiB of weights{found}"


def _byte_plan_words(result: dict) -> str:
    """How a byte budget was spent, in words: the formats and structures chosen, and what trained."""
    plan, structures = result.get("byte_plan") or {}, result.get("structures") or []
    counts = ", ".join(
        f"{n} in {fmt}" for fmt, n in sorted(plan.get("format_counts", {}).items(), key=lambda kv: -kv[1])
    )
    factored = sum(1 for choice in plan.get("layers", {}).values() if "/" in choice)
    menu = f"a format or {', '.join(structures)} factors in a format" if structures else "a format"
    return (
        f"each matrix planned as {menu} by measured output error per stored byte (planning/mixed.py): {counts}; "
        f"{factored} stored as factors, which distillation trained while the rest stayed in their formats"
        + _search_words(result.get("max_kl_search"))
    )


def _search_words(search: dict | None) -> str:
    """How a fidelity target's byte budget was found, and whether a plan met it."""
    if not search:
        return ""
    tried = len(search["tried"])
    if search["met"]:
        return (
            f"; the byte budget is the smallest of {tried} plans measured whose one-shot fidelity KL met "
            f"{search['max_kl']:g} ({search['fidelity_kl']:.4f} at {search['bytes'] / 2**20:.1f} MiB)"
        )
    return (
        f"; no plan met fidelity KL {search['max_kl']:g} one-shot ({tried} measured): the closest, "
        f"{search['fidelity_kl']:.4f} at {search['bytes'] / 2**20:.1f} MiB, "
        f"{search['fidelity_kl'] - search['max_kl']:.4f} over the target, was distilled"
    )


def _compression_words(compression: dict, calibration_tokens: int) -> str:
    """How the plan was made, in words: method, menu, calibration, how layers were weighed."""
    method = compression.get("method", "?")
    words = method
    if method == "auto":
        menu = compression.get("auto_methods")
        words += f" over {', '.join(menu)} (or dense)" if menu else " over every structure"
    words += ", fitted to the calibration tokens' outputs" if calibration_tokens else ", fitted to the weights"
    if compression.get("output_weights"):
        words += "; each layer's outputs weighted by the loss's squared gradient there (Fisher rows)"
    if compression.get("sequential"):
        words += "; refitted block by block to the teacher's outputs"
    return words


def _precision_words(precision: str) -> str:
    if precision == "no":
        return "fp32"
    return f"{precision} autocast (weights, optimizer and loss in fp32)"


def _plan_section(cells: list[dict]) -> list[str]:
    counts: dict[str, int] = {}
    for c in cells:
        counts[c["method"]] = counts.get(c["method"], 0) + 1
    summary = ", ".join(f"{n} {m}" for m, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return ["## The plan", "", f"Linear layers of the blocks: {summary}.", "", "![the plan](plan.png)", ""]


def _continuations_section(rows: list[dict]) -> list[str]:
    lines = ["## The same prompts, continued greedily", ""]
    for r in rows:
        lines += [
            f"**{r['prompt']}**",
            "",
            f"- teacher: {_one_line(r['teacher'])}",
            f"- student: {_one_line(r['student'])}",
            "",
        ]
    return lines


def _footprint_section(f: dict) -> list[str]:
    t, s, speed = f["teacher"], f["student"], f["speed"]
    mb = 2**20
    rows = [
        ["parameters", t["params"], s["params"], s["params"] / t["params"]],
        ["memory (MiB)", t["memory_bytes"] / mb, s["memory_bytes"] / mb, s["memory_bytes"] / t["memory_bytes"]],
        ["disk (MiB)", t["disk_bytes"] / mb, s["disk_bytes"] / mb, s["disk_bytes"] / t["disk_bytes"]],
        ["prefill time", "", "", speed["prefill_time_ratio"]],
        ["generation time", "", "", speed["generation_time_ratio"]],
    ]
    return [
        "## What it costs to hold and run",
        "",
        table(["", "teacher", "student", "student / teacher"], rows),
        "",
        f"Times: {speed['protocol']}. Disk: {f['disk_note']}.",
        "",
    ]


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
