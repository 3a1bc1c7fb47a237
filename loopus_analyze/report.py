"""The report: one self-contained HTML file (decision first) and the ``analysis.json`` sidecar.

:func:`render_html` reads nothing but the analysis dict that :mod:`loopus_analyze.analyze` writes to
``analysis.json``, so a report can be re-rendered from the JSON alone. The page opens offline: inline CSS,
plots as base64 PNG (matplotlib, Agg canvas, no pyplot state), no script other than the embedded JSON data
block. Every string that came from the user (model name and path, data path) is HTML-escaped, and the
embedded JSON escapes ``<``, ``>`` and ``&`` so it cannot close its ``<script>`` element.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np

from loopus_core.jsonio import dumps_strict, jsonable
from loopus_core.split import parse_pair

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------------------------- JSON


def dump_json(analysis: dict) -> str:
    """``analysis.json`` text (strict JSON: no NaN)."""
    return dumps_strict(analysis, indent=1)


def _script_safe_json(analysis: dict) -> str:
    """Compact JSON that is safe inside ``<script type="application/json">``.

    The per-batch HSIC arrays (``*_batches``, only needed to redo the bootstrap) stay in analysis.json.
    """
    embedded = dict(analysis)
    if isinstance(embedded.get("measurements"), dict):
        embedded["measurements"] = {k: v for k, v in embedded["measurements"].items()
                                    if not k.endswith("_batches")}
    text = json.dumps(jsonable(embedded), separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


# --------------------------------------------------------------------------------------------- plots


def _array(value) -> np.ndarray | None:
    if value is None:
        return None
    return np.array([np.nan if v is None else v for v in np.ravel(np.array(value, dtype=object))],
                    dtype=np.float64).reshape(np.shape(np.array(value, dtype=object)))


def _figure(width: float = 5.6, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig, alt: str, caption: str = "") -> str:
    """An ``<figure>`` with the figure as an inline base64 PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _heatmap(matrix: np.ndarray, title: str, split: tuple[int, int] | None, *, label: str = "state",
             vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
             caption: str = "") -> str:
    fig = _figure(5.2, 4.4)
    ax = fig.subplots()
    image = ax.imshow(matrix, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.85)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(label)
    ax.set_ylabel(label)
    if split is not None:
        a, b = split
        n = matrix.shape[0]
        from matplotlib.patches import Rectangle

        for lo, hi, color in ((0, a - 1, "white"), (a, b, "red"), (b + 1, n - 1, "white")):
            if hi >= lo:
                ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), hi - lo + 1, hi - lo + 1, fill=False,
                                       edgecolor=color, linewidth=1.6))
    return _png(fig, title, caption)


def _shade_states(ax, split: tuple[int, int] | None) -> None:
    """Shade the loop states A..B on a per-state axis."""
    if split is not None:
        ax.axvspan(split[0] - 0.5, split[1] + 0.5, color="tab:red", alpha=0.10, lw=0)
        for x in split:
            ax.axvline(x, color="tab:red", lw=0.8, ls="--")


def _shade_layers(ax, split: tuple[int, int] | None) -> None:
    """Shade the loop layers A..B-1 on a per-layer axis."""
    if split is not None:
        ax.axvspan(split[0] - 0.5, split[1] - 0.5, color="tab:red", alpha=0.10, lw=0)
        for x in (split[0] - 0.5, split[1] - 0.5):
            ax.axvline(x, color="tab:red", lw=0.8, ls="--")


def _lines(series: list[tuple[str, np.ndarray]], title: str, *, per_layer: bool,
           split: tuple[int, int] | None, ylabel: str = "", caption: str = "", logy: bool = False) -> str:
    fig = _figure()
    ax = fig.subplots()
    for name, values in series:
        values = np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(len(values)), values, marker="o", ms=3, lw=1.4, label=name)
    (_shade_layers if per_layer else _shade_states)(ax, split)
    ax.set_xlabel("layer i (state i -> i+1)" if per_layer else "state s (output of layer s-1)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        finite = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in series])
        finite = finite[np.isfinite(finite)]
        if finite.size and (finite > 0).all():
            ax.set_yscale("log")
        else:  # zeros present: linear near 0, no negative decades for non-negative data
            ax.set_yscale("symlog", linthresh=1e-3)
            if finite.size and (finite >= 0).all():
                ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _png(fig, title, caption)


# ---------------------------------------------------------------------------------------------- html


def _e(value) -> str:
    """HTML-escaped text of anything."""
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "&ndash;" if value is None else f"{100 * value:.0f}%"


def _table(header: list[str], rows: list[list[str]], *, left: int = 1, best_first: bool = False) -> str:
    """A table from pre-escaped cell HTML; the first ``left`` columns are left-aligned."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row))
        body.append(f'<tr class="{"best" if best_first and r == 0 else ""}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _layers_text(lo: int, hi: int) -> str:
    """Layers lo..hi-1 as text."""
    if hi <= lo:
        return "none"
    return f"{lo}" if hi - lo == 1 else f"{lo}&ndash;{hi - 1}"


def _split_tuple(text: str) -> tuple[int, int]:
    pair = parse_pair(text)
    if pair is None:
        raise ValueError(f"not an A:B split: {text!r}")
    return pair


def _control_median(functional: dict | None, kind: str, metric: str) -> float | None:
    if not functional or not functional.get("controls"):
        return None
    return float(np.median([c[kind][metric] for c in functional["controls"]]))


def _decision_html(a: dict) -> str:
    d = a["decision"]
    split = a["split"]
    num_layers = d["num_layers"]
    s, e = _split_tuple(split)
    conf = d["confidence"]
    parts = [
        '<h2 style="border:0;margin-top:8px">Decision</h2><div class="panel">',
        f'<div><span class="muted">recommended split</span><br><span class="split" id="recommended-split">'
        f'{_e(split)}</span><span class="badge {_e(conf)}" id="confidence">{_e(conf)} confidence</span>'
        "</div>",
        f"<p>Encoder: layers {_layers_text(0, s)} &middot; <b>loop block: layers {_layers_text(s, e)}</b> "
        f"({e - s} layers, run K times under the gate) &middot; "
        f"decoder: layers {_layers_text(e, num_layers)} "
        f"+ final norm + lm_head ({num_layers} layers in all).</p>",
        f'<p><b>Why this confidence:</b> {_e(d["reason"])}</p>',
        "<p>Convert the model with this split:</p>",
        f'<pre class="cmd" id="convert-command">{_e(a["convert_command"])}</pre>',
        "</div>",
        "<h3>Candidates</h3>",
        '<p class="note">Ranked: the top candidates by similarity were re-ranked by the functional check '
        "(KL of repeating the block relative to same-length controls, lower is better); the rest keep their "
        "similarity order. <i>score</i> = size-weighted mean within-segment debiased CKA "
        "(higher is better).</p>",
    ]
    rows = []
    for c in d["candidates"]:
        f = c.get("functional")
        ratio = None
        ctrl = _control_median(f, "repeat", "kl")
        if f and ctrl is not None:
            ratio = f["repeat"]["kl"] / max(ctrl, 1e-12)
        rows.append([
            str(c["rank"]), f'<code>{_e(c["split"])}</code>', _layers_text(c["start"], c["end"]),
            str(c["end"] - c["start"]), _num(c["score"], 4), str(c["score_rank"]),
            _pct(c.get("bootstrap_frequency")),
            _num(f["repeat"]["delta_nll"], 3, True) if f else "&ndash;",
            _num(f["repeat"]["kl"], 3) if f else "&ndash;",
            _num(ctrl, 3), _num(ratio, 2),
            _num(f["skip"]["delta_nll"], 3, True) if f else "&ndash;",
        ])
    parts.append(_table(
        ["rank", "split", "loop layers", "size", "score", "score rank", "bootstrap", "repeat &Delta;NLL",
         "repeat KL", "controls KL", "KL ratio", "skip &Delta;NLL"],
        rows, left=2, best_first=True))
    parts.append(f'<p class="note"><b>How the split is searched.</b> {_e(d.get("rule", ""))}</p>')
    return "\n".join(parts)


def _similarity_html(a: dict, split: tuple[int, int]) -> str:
    m = a["measurements"]
    deb = _array(m["cka_debiased"])
    bia = _array(m["cka_biased"])
    figs = [
        _heatmap(deb, "debiased linear CKA (states)", split, vmin=min(0.0, np.nanmin(deb)), vmax=1.0,
                 caption="The estimator the split is chosen from. Boxes: encoder / loop / decoder states."),
        _heatmap(bia, "biased linear CKA (for comparison)", split, vmin=0.0, vmax=1.0,
                 caption="Biased CKA is inflated when tokens per batch < hidden size; shown for comparison."),
    ]
    surface = _array(a["search"]["surface"])
    if surface is not None:
        masked = np.ma.masked_invalid(surface)
        fig = _figure(5.2, 4.4)
        ax = fig.subplots()
        image = ax.imshow(masked.T, origin="lower", cmap="magma", interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.85)
        best = _split_tuple(a["search"]["best"])
        ax.plot([best[0]], [best[1]], marker="*", color="cyan", ms=14, mec="black")
        ax.plot([split[0]], [split[1]], marker="o", color="none", mec="red", ms=14, mew=2)
        ax.set_xlabel("A (first loop layer)")
        ax.set_ylabel("B (first decoder layer)")
        ax.set_title("objective surface over all (A, B)", fontsize=10)
        figs.append(_png(fig, "objective surface", "Star: best by similarity; red circle: recommended."))
    return (
        '<p class="note">Each row/column is a token state: 0 = embeddings output, s = output of layer s-1 '
        "(the last one before the final norm). The loop block A:B covers states A..B.</p>"
        f'<div class="figs">{"".join(figs)}</div>'
    )


def _dynamics_html(a: dict, split: tuple[int, int]) -> str:
    m = a["measurements"]
    figs = []
    drift = [(n, _array(m[k])) for n, k in (("raw", "drift"), ("mean-centred", "drift_centred"))
             if m.get(k) is not None]
    if drift:
        figs.append(_lines(drift, "angular drift between consecutive states", per_layer=True, split=split,
                           ylabel="arccos(cos)/pi", caption="Layers that change the stream little form the "
                           "plateau; shaded: the loop layers."))
    if m.get("rel_update") is not None:
        figs.append(_lines([("||h_{s+1}-h_s|| / ||h_s||", _array(m["rel_update"]))], "relative update norm",
                           per_layer=True, split=split, ylabel="ratio"))
    if m.get("distance") is not None:
        figs.append(_heatmap(_array(m["distance"]), "mean angular distance d(s, t)", split, vmin=0.0,
                             cmap="cividis_r", caption="Gromov-style distance between any two states."))
    massive = m.get("massive") or {}
    if massive.get("ratio_to_median") is not None:
        series = [("max |h| / median |h| (tokens used)", _array(massive["ratio_to_median"]))]
        figs.append(_lines(series, "massive activations", per_layer=False, split=split, ylabel="ratio",
                           logy=True))
    return f'<div class="figs">{"".join(figs)}</div>'


def _readouts_html(a: dict, split: tuple[int, int]) -> str:
    m = a["measurements"]
    figs = []
    if m.get("lens_kl") is not None and np.isfinite(_array(m["lens_kl"])).any():
        figs.append(_lines([("KL(final || lens)", _array(m["lens_kl"])),
                            ("entropy of lens", _array(m["lens_entropy"]))],
                           "logit lens (final norm recomputed per state)", per_layer=False, split=split,
                           ylabel="nats"))
        figs.append(_lines([("top-1 agreement with the final prediction", _array(m["lens_top1"]))],
                           "logit lens top-1", per_layer=False, split=split, ylabel="fraction"))
    probes = m.get("probes") or {}
    for task, result in probes.items():
        series = [(name, _array(result[name])) for name in ("accuracy", "control", "selectivity")
                  if result.get(name) is not None]
        if series:
            figs.append(_lines(series, f"probe: {task} token" if task != "position" else "probe: position",
                               per_layer=False, split=split, ylabel="accuracy",
                               caption="control = same probe on a random relabelling per token type "
                               "(Hewitt & Liang); selectivity = accuracy - control."))
    if not figs:
        return '<p class="note">No lens or probe measurements (turned off).</p>'
    note = "" if probes else '<p class="note">Probes were turned off (--no-probes).</p>'
    return f'{note}<div class="figs">{"".join(figs)}</div>'


def _functional_html(a: dict) -> str:
    f = a.get("functional")
    if not f:
        reason = a.get("functional_skipped") or "not run"
        return f'<p class="note">The functional check was not run: {_e(reason)}.</p>'
    effects = f["effects"]
    controls = f["controls"]
    candidate_set = list(controls)
    rows = []
    for key in candidate_set + [k for k in effects if k not in candidate_set]:
        role = "candidate" if key in candidate_set else "control of " + ", ".join(
            c for c, ctrl in controls.items() if key in ctrl)
        eff = effects[key]
        rows.append([
            f"<code>{_e(key)}</code>", _e(role),
            _num(eff["repeat"]["delta_nll"], 3, True), _num(eff["repeat"]["kl"], 3),
            _pct(eff["repeat"]["top1_agreement"]),
            _num(eff["skip"]["delta_nll"], 3, True), _num(eff["skip"]["kl"], 3),
            _pct(eff["skip"]["top1_agreement"]),
        ])
    table = _table(["block", "role", "repeat &Delta;NLL", "repeat KL", "repeat top-1", "skip &Delta;NLL",
                    "skip KL", "skip top-1"], rows, left=2)
    fig = _figure(7.0, 3.4)
    ax = fig.subplots()
    keys = list(effects)
    xs = np.arange(len(keys))
    colors = ["tab:red" if k in candidate_set else "tab:gray" for k in keys]
    ax.bar(xs - 0.2, [effects[k]["repeat"]["kl"] for k in keys], 0.4, color=colors,
           label="repeat (run twice)")
    ax.bar(xs + 0.2, [effects[k]["skip"]["kl"] for k in keys], 0.4, color=colors, alpha=0.45,
           label="skip (removed)")
    ax.set_xticks(xs, keys, rotation=45, fontsize=8)
    ax.set_ylabel("KL to base model (nats)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title("functional check: candidates (red) and same-length controls (grey)", fontsize=10)
    ax.legend(fontsize=8)
    plot = _png(fig, "functional check")
    return (
        f'<p class="note">Held-out text ({_num(f["tokens"])} predictions, first position and padding '
        f'masked); base NLL {_num(f["base_nll"], 3)} nats. <i>repeat</i>: layers [0..B) + [A..B) + '
        "[B..L), the block run twice (an untrained 2-loop model without the gate); <i>skip</i>: layers "
        "[0..A) + [B..L). KL = mean KL(base || variant) of the next-token distributions. A good loop block "
        "hurts less when repeated than same-length blocks elsewhere.</p>"
        f'{table}<div class="figs">{plot}</div>'
    )


def _evidence_html(a: dict) -> str:
    d = a["decision"]
    rows = [[_e(cp["signal"]), _e(cp["description"]), f'<code>{_e(cp["split"])}</code>',
             _num(cp.get("distance")), "yes" if cp.get("agrees") else "no"] for cp in d["change_points"]]
    cps = _table(["signal", "curve", "change points", "layers off", "agrees"], rows, left=2) if rows else (
        '<p class="note">No usable 1-D curve.</p>')
    boot = d["bootstrap"]
    if boot["resamples"]:
        counts = sorted(boot["counts"].items(), key=lambda kv: -kv[1])[:8]
        brows = [[f"<code>{_e(k)}</code>", str(v), _pct(v / boot["resamples"])] for k, v in counts]
        bhtml = (f'<p class="note">{boot["resamples"]} resamples of the measuring batches (with replacement);'
                 f' CKA recomputed from the per-batch HSIC terms and the exact search re-run each time. '
                 f'A in {boot["start_interval"][0]}..{boot["start_interval"][1]}, B in '
                 f'{boot["end_interval"][0]}..{boot["end_interval"][1]} (5%..95%).</p>'
                 + _table(["split", "resamples", "share"], brows))
    else:
        bhtml = '<p class="note">No bootstrap: fewer than two measuring batches.</p>'
    return ("<h3>Change points of the 1-D curves</h3>"
            '<p class="note">Exact two-change-point least-squares segmentation of each curve, mapped to A:B '
            "with the same rule as the CKA search; a curve agrees when both ends are within 2 layers.</p>"
            f"{cps}<h3>Bootstrap over batches</h3>{bhtml}")


def _diagnostics_html(a: dict) -> str:
    m = a["measurements"]
    deb = _array(m["cka_debiased"])
    bia = _array(m["cka_biased"])
    off = ~np.eye(deb.shape[0], dtype=bool)
    rows = [
        ["tokens used (first position and padding excluded)", _num(m.get("tokens_used"))],
        ["measuring batches", _num(m.get("num_batches"))],
        ["tokens per batch (mean) / hidden size",
         f'{_num(m["tokens_used"] / max(m["num_batches"], 1), 0)} / {_num(m.get("hidden_size"))}'],
        ["sequence length", _num(m.get("seq_len"))],
        ["non-finite values in the states", _num(m.get("nan_count"))],
        ["NaN in the debiased CKA matrix", str(int(np.isnan(deb).sum()))],
        ["max |diag - 1| of debiased CKA", _num(float(np.nanmax(np.abs(np.diag(deb) - 1.0))), 6)],
        ["mean off-diagonal CKA: debiased / biased",
         f"{_num(float(np.nanmean(deb[off])))} / {_num(float(np.nanmean(bia[off])))}"],
        ["lens tokens / probe tokens", f'{_num(m.get("lens_tokens"))} / {_num(m.get("probe_tokens"))}'],
    ]
    figs = ""
    if m.get("cka_with_bos") is not None:
        bos = _array(m["cka_with_bos"])
        rows.append(["mean |CKA with BOS - CKA without| (off-diagonal)",
                     _num(float(np.nanmean(np.abs(bos - deb)[off])))])
        figs = _heatmap(bos - deb, "CKA with the first position minus without", None, cmap="coolwarm",
                        vmin=-1.0, vmax=1.0, caption="What keeping the BOS / attention-sink token would do.")
    massive = m.get("massive") or {}
    if massive.get("bos_max_abs") is not None and massive.get("max_abs") is not None:
        rows.append(["max |h| at the first position / elsewhere (largest over states)",
                     f'{_num(float(np.nanmax(_array(massive["bos_max_abs"]))), 1)} / '
                     f'{_num(float(np.nanmax(_array(massive["max_abs"]))), 1)}'])
    table = _table(["diagnostic", "value"], [[_e(k), v] for k, v in rows])
    return table + (f'<div class="figs">{figs}</div>' if figs else "")


def _provenance_html(a: dict) -> str:
    p = a["provenance"]
    rows = [[_e(k), f"<code>{_e(v)}</code>"] for k, v in p.items() if not isinstance(v, dict)]
    for group in ("versions", "wall_time_s"):
        for k, v in (p.get(group) or {}).items():
            shown = f"{v:.1f} s" if group == "wall_time_s" and isinstance(v, int | float) else v
            rows.append([_e(f"{group}.{k}"), f"<code>{_e(shown)}</code>"])
    return _table(["field", "value"], rows, left=2)


def render_html(analysis: dict) -> str:
    """The whole report page from an analysis dict (as written to ``analysis.json``)."""
    page = resources.files("loopus_analyze").joinpath("templates/report.html").read_text("utf-8")
    template = Template(page)
    split = _split_tuple(analysis["split"])
    model = analysis["model"]
    prov = analysis["provenance"]
    sub = (f'{model["family"]} &middot; {model["num_layers"]} layers &middot; hidden {model["hidden_size"]} '
           f'&middot; {_e(prov.get("tokens_used"))} tokens &middot; {_e(prov.get("date"))}')
    return template.substitute(
        title=_e(f"loopus analyze: {model['name']}"),
        heading=f"Layer analysis of {_e(model['name'])}",
        subtitle=sub,
        decision=_decision_html(analysis),
        similarity=_similarity_html(analysis, split),
        dynamics=_dynamics_html(analysis, split),
        readouts=_readouts_html(analysis, split),
        functional=_functional_html(analysis),
        evidence=_evidence_html(analysis),
        diagnostics=_diagnostics_html(analysis),
        provenance=_provenance_html(analysis),
        data_json=_script_safe_json(analysis),
    )


def write_report(analysis: dict, directory: Path) -> tuple[Path, Path]:
    """Write ``analysis.json`` and ``report.html`` into ``directory`` (the caller's temporary directory)."""
    json_path = directory / "analysis.json"
    html_path = directory / "report.html"
    json_path.write_text(dump_json(analysis), encoding="utf-8")
    html_path.write_text(render_html(analysis), encoding="utf-8")
    return json_path, html_path
