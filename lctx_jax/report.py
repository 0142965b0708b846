"""The eval.py report: results.json, results.md (tables) and PNG plots of perplexity and
passkey accuracy by length, one file each, written atomically (`lctx_jax.paths`).

matplotlib is imported here only, so metrics (`lctx_jax.evaluation`) never pull it in.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import re
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from lctx_jax import paths



def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Writes results.json, results.md and plots into out_dir -> the paths written.

    results:
        {"perplexity": {setting: {method: {str(length): Perplexity.as_dict() or a dict with
                                                          at least "perplexity"}}},
         "passkey":    {setting: {method: passkey_accuracy(...)}},
         "needle":     {setting: {method: needle_accuracy(...)}},
         "meta":       {free-form: model, dataset, protocol, ...}}
    Every part is optional; a setting is e.g. "no fine-tune" or "fine-tuned". Perplexity
    objects, numpy values and tuples are converted; non-finite floats become null.

    results.md: the meta as a list; then every method of every setting in one table each for
    perplexity, passkey and needle accuracy (rows "method · setting", columns lengths; 2
    decimals, accuracy in % as the mean over depths); then a table per setting of each.
    perplexity.png: perplexity against length (both log axes), a line per method and a panel
    per setting. passkey_<method>.png: accuracy heat map, depth × length, a panel per setting
    (characters of the method other than letters, digits, "_", "." and "-" become "_");
    needle_<method>.png the same for the needle-in-a-haystack accuracy.
    Every file is written to a temporary name and renamed, so readers never see half a file.
    """
    safe = _json_safe(results)
    out = pathlib.Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = [_write(out / "results.json", json.dumps(safe, indent=2, allow_nan=False).encode()),
               _write(out / "results.md", _markdown(safe).encode())]
    if safe.get("perplexity"):
        written.append(_write(out / "perplexity.png", _perplexity_plot(safe["perplexity"])))
    for kind in ("passkey", "needle"):
        grids = safe.get(kind) or {}
        for method in dict.fromkeys(m for per_method in grids.values() for m in per_method):
            panels = {s: per_method[method] for s, per_method in grids.items()
                      if method in per_method}
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", method)
            title = method if kind == "passkey" else f"{method}, {_needles(panels)}-key haystack"
            written.append(_write(out / f"{kind}_{name}.png", _heat_map(title, panels)))
    return written


def _needles(panels: dict[str, dict[str, Any]]) -> str:
    return "/".join(str(n) for n in sorted({r.get("needles") for r in panels.values()}))


def _json_safe(value: Any) -> Any:
    if hasattr(value, "as_dict"):  # evaluation.Perplexity
        return _json_safe(value.as_dict())
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write(path: pathlib.Path, content: bytes) -> pathlib.Path:
    paths.write_atomically(path, content)
    return path


def _table(rows: dict[str, dict[int, str]], label: str = "method") -> list[str]:
    """Markdown table: a row per method, a column per length (sorted), '–' where missing."""
    lengths = sorted({n for cells in rows.values() for n in cells})
    lines = [f"| {label} | " + " | ".join(str(n) for n in lengths) + " |",
             "| --- |" + " ---: |" * len(lengths)]
    for method, cells in rows.items():
        name = method.replace("|", "\\|")
        lines.append(f"| {name} | " + " | ".join(cells.get(n, "–") for n in lengths) + " |")
    return lines


def _perplexity_rows(per_method: dict[str, Any]) -> dict[str, dict[int, str]]:
    return {m: {int(n): _number(r.get("perplexity"), "{:.2f}") for n, r in by_len.items()}
            for m, by_len in per_method.items()}


def _accuracy_rows(per_method: dict[str, Any]) -> dict[str, dict[int, str]]:
    return {m: {n: _number(_mean(acc), "{:.1f}", 100) for n, acc in
                zip(r["lengths"], r["accuracy"])} for m, r in per_method.items()}


_KINDS = (("perplexity", "Perplexity", _perplexity_rows),
          ("passkey", "Passkey retrieval (accuracy %, mean over depths)", _accuracy_rows),
          ("needle", "Multi-key needle in a haystack (accuracy %, mean over depths)",
           _accuracy_rows))


def _markdown(results: dict[str, Any]) -> str:
    lines = ["# Evaluation results", ""]
    for key, value in (results.get("meta") or {}).items():
        lines.append(f"- {key}: {value}")
    for kind, title, rows_of in _KINDS:
        settings = results.get(kind) or {}
        if len(settings) > 1:
            every = {f"{m} · {setting}": row for setting, per_method in settings.items()
                     for m, row in rows_of(per_method).items()}
            lines += ["", f"## {title}: every method", "", *_table(every, "method · setting")]
    for kind, title, rows_of in _KINDS:
        for setting, per_method in (results.get(kind) or {}).items():
            lines += ["", f"## {title}: {setting}", ""]
            if kind != "perplexity":
                trials = sorted({r["trials"] for r in per_method.values()})
                lines += [f"{'/'.join(map(str, trials))} trials per length and depth.", ""]
            lines += _table(rows_of(per_method))
    return "\n".join(lines) + "\n"


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else None


def _number(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else fmt.format(value * scale)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _perplexity_plot(perplexity: dict[str, Any]) -> bytes:
    fig = Figure(figsize=(5.5 * len(perplexity), 4), layout="constrained")
    axes = fig.subplots(1, len(perplexity), squeeze=False)[0]
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for ax, (setting, per_method) in zip(axes, perplexity.items()):
        lengths = sorted({int(n) for by_len in per_method.values() for n in by_len})
        for method, by_len in per_method.items():
            points = sorted((int(n), r["perplexity"]) for n, r in by_len.items()
                            if r.get("perplexity") is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        if ax.lines:
            ax.legend(fontsize="small")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(setting)
        ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def _heat_map(title: str, panels: dict[str, dict[str, Any]]) -> bytes:
    fig = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (setting, r) in zip(axes, panels.items()):
        grid = np.array([[np.nan if a is None else a for a in row] for row in r["accuracy"]],
                        float).T  # [depths, lengths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto",
                          origin="lower")
        for (d, n), value in np.ndenumerate(grid):
            ax.text(n, d, "–" if np.isnan(value) else f"{value:.2f}", ha="center",
                    va="center", fontsize="small")
        ax.set_xticks(range(len(r["lengths"])), [str(n) for n in r["lengths"]])
        ax.set_yticks(range(len(r["depths"])), [f"{d:g}" for d in r["depths"]])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{title}: {setting}")
    fig.colorbar(image, ax=list(axes), label="accuracy")
    return _png(fig)
