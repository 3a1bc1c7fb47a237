"""The report: one self-contained HTML file (decision first) and the ``analysis.json`` sidecar.

:func:`render_html` reads nothing but the analysis dict that :mod:`loopus_analyze.analyze` writes to
``analysis.json``, so a report can be re-rendered from the JSON alone. The page opens offline: inline CSS,
plots as base64 PNG (:mod:`loopus_analyze.plots`), no script other than the embedded JSON data block.
Every string that came from the user (model name and path, data path) is HTML-escaped, and the embedded
JSON escapes ``<``, ``>`` and ``&`` so it cannot close its ``<script>`` element.

Order of the page: the decision (split, rule, confidence, the numbers behind it with intervals), the
repeat-cost map, deeper repetition, then the similarity views that explain the layers, and the rest.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from string import Template

from loopus_analyze import plots
from loopus_analyze import report_views as views
from loopus_analyze.htmlkit import array, e, interval, layers_text, num, split_tuple, table
from loopus_core.jsonio import dumps_strict, jsonable

SCHEMA_VERSION = 2


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


# ------------------------------------------------------------------------------------------ decision


def _block_row(row: dict, *, selection: bool = False, difference: bool = False) -> list[str]:
    cells = [f'<code>{e(row["split"])}</code>', layers_text(row["start"], row["end"]), str(row["length"])]
    if selection:
        cells.append(num(row.get("selection_delta_nll"), 3, True))
    cells += [interval(row["repeat"]["delta_nll"]), interval(row["repeat"]["kl"], signed=False),
              interval(row["skip"]["delta_nll"])]
    if difference:
        cells.append(interval(row["difference"]))
    return cells


def _decision_html(a: dict) -> str:
    d = a["decision"]
    split = a["split"]
    num_layers = a["model"]["num_layers"]
    s, t = split_tuple(split)
    conf = d["confidence"]
    rec = d["recommended"]
    rep = d["report_text"]
    units = _units(a)
    return "\n".join([
        '<h2 style="border:0;margin-top:8px">Decision</h2><div class="panel">',
        f'<div><span class="muted">recommended split</span><br><span class="split" id="recommended-split">'
        f'{e(split)}</span><span class="badge {e(conf)}" id="confidence">{e(conf)} confidence</span></div>',
        f"<p>Encoder: layers {layers_text(0, s)} &middot; <b>loop block: layers {layers_text(s, t)}</b> "
        f"({t - s} layers, run K times under the gate) &middot; decoder: layers {layers_text(t, num_layers)} "
        f"+ final norm + lm_head ({num_layers} layers in all).</p>",
        f'<p id="rule"><b>Rule:</b> {e(a["rule"]["sentence"])}.</p>',
        f'<p><b>Repeat cost on the report text</b> (held-out, never seen by the rule: {rep["documents"]} '
        f'{e(units)}, {rep["tokens"]} predictions): '
        f'<span id="recommended-repeat">{interval(rec["repeat"]["delta_nll"])}</span> nats per token when '
        f'the block runs twice (KL {interval(rec["repeat"]["kl"], signed=False)}); skipping it costs '
        f'{interval(rec["skip"]["delta_nll"])}. 90% intervals from a bootstrap over {e(units)}.</p>',
        f'<p><b>Why:</b> <span id="reason">{e(d["reason"])}</span></p>',
        _stability_html(d),
        "<p>Convert the model with this split:</p>",
        f'<pre class="cmd" id="convert-command">{e(a["convert_command"])}</pre>',
        "</div>",
        f'<div class="figs">{_length_figure(a)}</div>',
        _race_html(a),
        _tables_html(a),
    ])


def _stability_html(d: dict) -> str:
    """Whether the selection text separates the choice from what the rule would take instead."""
    stability = d.get("stability")
    if not stability or not stability["sentence"]:
        return ""
    label = "stable" if stability["stable"] else "unstable"
    rows = [[f"<code>{e(r['split'])}</code>", str(r["length"]), f"{r['delta_nll']:+.3f}", str(r["tokens"]),
             e(r["why"])] for r in stability["alternatives"]]
    return (f'<p id="stability"><span class="badge {label}">{label}</span> {e(stability["sentence"])}.</p>'
            + (table(["alternative", "layers", "selection repeat cost", "predictions", "why not separated"],
                     rows, left=5, table_id="alternatives") if rows else ""))


def _units(a: dict) -> str:
    """What the bootstrap resamples: documents, or pieces of documents when the held-out text has few."""
    return a["provenance"].get("map_units", "documents")


def _length_figure(a: dict) -> str:
    """The cheapest repeat cost of each length against the budget: the curve the rule reads."""
    split = split_tuple(a["split"])
    per_length = a["decision"]["per_length"]
    rows = [(r["length"], r["repeat"]["delta_nll"]) for r in per_length]
    selection = [("selection text (the race)", [(r["length"], r["selection_delta_nll"]) for r in per_length])]
    budget = None if (a["rule"]["lengths_given"] and a["rule"]["lengths"][0] == a["rule"]["lengths"][1]
                      and not a["rule"]["budget_given"]) else a["rule"]["budget_nats"]
    return plots.estimates(rows, "the cheapest block of each length against the budget",
                           xlabel="loop block length (layers)", ylabel="repeat ΔNLL (nats per token)",
                           highlight=split[1] - split[0], line=budget, series=selection,
                           caption="Report text with 90% intervals (blocks beside the choice and its "
                           "neighbours read its first windows only); crosses: the selection text.")


def _race_html(a: dict) -> str:
    """How the race spent its compute: rounds, the survivors' predictions, why each length's leader won."""
    race = a["repeat_map"].get("race")
    if not race:
        return ""
    rows = [[str(r["index"]), str(r["entered"]), f'{r["windows"]} ({r["documents"]})', str(r["tokens"]),
             str(r["survivors"]), str(r["out_placement"]), str(r["out_length"]), str(r.get("narrowed", 0)),
             f'{r["work"]:.3g}']
            for r in race["rounds"]]
    leaders = [[str(n), e(why)] for n, why in race["leaders"].items()]
    contenders = ", ".join(f"<code>{e(k)}</code> {v}" for k, v in race["contenders"].items())
    m = a["repeat_map"]
    return (
        "<h3>The race on the selection text</h3>"
        f'<p class="note" id="race">{race["candidates"]} splits the rule may choose entered; windows of '
        f'{m["window"]} tokens, scored from position {m["warmup"]} on (a round scores every '
        f'{race["settings"]["head_stride"]}th of those predictions). Each round the survivors read more '
        "windows (one document each while the documents last); a split leaves when its length's leader "
        f'repeats more cheaply (paired {race["settings"]["elimination_level"]:.0%} t interval over '
        "documents) or its length can no longer be the rule's choice; when the next round of every survivor "
        "would pass the work cap, the race narrows to each length's leader (by point estimate) and goes on. "
        "Stopped: "
        f'{e(race["stop"])}. Work: {race["work"]:.3g} layer-tokens '
        f'({race["work"] / max(race["uniform_work"], 1.0):.0%} '
        f"of the uniform map at {race['final_tokens_asked']} predictions per split). The choice and its "
        f"neighbours, with every prediction of the final windows: {contenders}.</p>"
        + table(["round", "splits entered", "windows (documents)", "predictions scored each", "left after",
                 "out: placement", "out: length", "narrowed", "work"], rows, table_id="race-rounds")
        + "<details><summary>Why each length's leader won</summary>"
        + table(["length", "leader and verdict"], leaders, left=2, table_id="race-leaders") + "</details>"
    )


def _tables_html(a: dict) -> str:
    """The cheapest block of every length and every block of the chosen length, folded away."""
    d = a["decision"]
    split = a["split"]
    sel = a["repeat_map"]
    per_length = d["per_length"]
    rows = [_block_row(r, selection=True) for r in per_length]
    highlight = {i for i, r in enumerate(per_length) if r["split"] == split}
    return "\n".join([
        f"<details><summary>The cheapest block of every length ({len(rows)} rows)</summary>",
        f'<p class="note">Chosen per length by the race on the selection text ({sel["documents"]} '
        f'{e(_units(a))}, {sel["tokens"]} predictions in all; the <i>selection</i> column is what the rule '
        "read), then measured on the report text (every other column, with 90% intervals). &Delta;NLL = "
        "held-out NLL change against the base model, nats per token; KL = mean KL(base || variant).</p>",
        table(["split", "loop layers", "size", "selection &Delta;NLL", "repeat &Delta;NLL", "repeat KL",
               "skip &Delta;NLL"], rows, left=2, highlight=highlight, table_id="per-length"),
        "</details>",
        _same_length_html(d, split),
    ])


def _same_length_html(d: dict, split: str) -> str:
    same = d["same_length"]
    rows = [_block_row(r, difference=True) for r in same]
    highlight = {i for i, r in enumerate(same) if r["split"] == split}
    verdict = ("is the best of its length within its interval" if d["best_within_interval"] else
               "is NOT the best of its length: a block below repeats more cheaply with an interval below 0")
    return (
        f"<details><summary>Every block of the recommended length ({d['recommended']['length']} layers, "
        f"{len(rows)} rows)</summary>"
        f'<p class="note" id="best-of-length">On the report text the recommendation {verdict}. Last column: '
        "repeat &Delta;NLL of the block minus the recommendation's, with a paired interval (same documents "
        "in every resample). Neighbours (start 1-2 layers away) set the confidence.</p>"
        + table(["split", "loop layers", "size", "repeat &Delta;NLL", "repeat KL", "skip &Delta;NLL",
                 "minus recommended"], rows, left=2, highlight=highlight, table_id="same-length")
        + "</details>"
    )


def _map_html(a: dict) -> str:
    m = a["repeat_map"]
    split = split_tuple(a["split"])
    marks = {"recommended": split}
    similar = a["similarity"]["best"]
    if similar != a["split"]:
        marks["similarity (raw CKA)"] = split_tuple(similar)
    figs = [
        plots.split_map(array(m["repeat"]["delta_nll"]), "repeat cost: ΔNLL when the block A:B runs twice",
                        marks, label="nats per token", symmetric=True,
                        caption="Selection text, what the rule read (each split on the predictions the race "
                        "gave it). Blue: repeating helps, red: it hurts; blank: not a split the rule may "
                        "choose."),
    ]
    if m["repeat"].get("tokens") is not None:
        figs.append(plots.split_map(array(m["repeat"]["tokens"]), "predictions each split read in the race",
                                    marks, label="predictions", caption="Selection text."))
    return (
        f'<p class="note">The splits the rule may choose, on the selection text ({m["documents"]} '
        f'{e(_units(a))}, {m["tokens"]} predictions in all, base NLL {num(m["base_nll"])} nats): the block '
        "run twice is layers [0..B) + [A..B) + [B..L), computed from the base model's state h_B (the first "
        "pass ends there). Skip costs are measured on the report text for the blocks in the tables.</p>"
        f'<div class="figs">{"".join(figs)}</div>'
    )


def _deeper_html(a: dict) -> str:
    deeper = a["decision"]["deeper"]
    if not deeper:
        return '<p class="note">No deeper repetition was measured.</p>'
    curves = [(f'{b["split"]} ({b["length"]})', [p["delta_nll"] for p in b["passes"]]) for b in deeper]
    change = [(f'{b["split"]} ({b["length"]})', [p["state_change"] for p in b["passes"]]) for b in deeper]
    rows = [[f'<code>{e(b["split"])}</code>', str(b["length"])]
            + [interval(p["delta_nll"]) for p in b["passes"][1:]] for b in deeper]
    header = ["block", "layers"] + [f"{p['passes']} passes" for p in deeper[0]["passes"][1:]]
    return (
        '<p class="note">The leading blocks run 2-4 times on the report text (one pass is the base model, '
        "&Delta;NLL 0 by definition): does the block settle (the loop state moves less with each pass, the "
        "cost levels off) or drift? Pass k+1 reads pass k's output of the block.</p>"
        + table(header, rows, left=2, table_id="deeper")
        + '<div class="figs">'
        + plots.pass_curves(curves, "ΔNLL against the base model", ylabel="nats per token")
        + plots.pass_curves(change, "loop state change |r_k - r_(k-1)| / |r_(k-1)|", ylabel="relative change",
                            caption="r_1 = h_B (the base model's block output), r_0 = h_A.")
        + "</div>"
    )


def render_html(analysis: dict) -> str:
    """The whole report page from an analysis dict (as written to ``analysis.json``)."""
    page = resources.files("loopus_analyze").joinpath("templates/report.html").read_text("utf-8")
    split = split_tuple(analysis["split"])
    model = analysis["model"]
    prov = analysis["provenance"]
    sub = (f'{model["family"]} &middot; {model["num_layers"]} layers &middot; hidden {model["hidden_size"]} '
           f'&middot; {e(prov.get("tokens_used"))} measured tokens &middot; {e(prov.get("date"))}')
    return Template(page).substitute(
        title=e(f"loopus analyze: {model['name']}"),
        heading=f"Layer analysis of {e(model['name'])}",
        subtitle=sub,
        decision=_decision_html(analysis),
        repeat_map=_map_html(analysis),
        deeper=_deeper_html(analysis),
        similarity=views.disagreement_html(analysis) + views.similarity_html(analysis, split)
        + views.massive_html(analysis, split),
        dynamics=views.dynamics_html(analysis, split),
        readouts=views.readouts_html(analysis, split),
        evidence=views.evidence_html(analysis),
        diagnostics=views.diagnostics_html(analysis),
        provenance=views.provenance_html(analysis),
        data_json=_script_safe_json(analysis),
    )


def write_report(analysis: dict, directory: Path) -> tuple[Path, Path]:
    """Write ``analysis.json`` and ``report.html`` into ``directory`` (the caller's temporary directory)."""
    json_path = directory / "analysis.json"
    html_path = directory / "report.html"
    json_path.write_text(dump_json(analysis), encoding="utf-8")
    html_path.write_text(render_html(analysis), encoding="utf-8")
    return json_path, html_path
