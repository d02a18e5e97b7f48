"""Plain-text tables for the terminal and report files."""

from __future__ import annotations

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
            result["format"],
            layer["weights"],
            layer["float_bytes"] / 2**20,
            layer["stored_bytes"] / 2**20,
            layer["error"],
        ]
        for layer in result["layers"]
    ]
    text = table(["layer", "kind", "format", "weights", "float MiB", "stored MiB", "rel. error"], rows, "lllrrrr")
    return (
        text + f"\n{len(rows)} layers in {result['format']}: {result['quantized_float_bytes'] / 2**20:.1f} MiB -> "
        f"{result['quantized_stored_bytes'] / 2**20:.1f} MiB; weights file {result['weights_file_bytes']:,} bytes"
    )


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
