"""The report's explanation sections: similarity views and massive activations, dynamics, lens and probes,
change points and bootstrap, estimator diagnostics, provenance. Each reads only the analysis dict."""

from __future__ import annotations

import numpy as np

from loopus_analyze import plots
from loopus_analyze.htmlkit import array, e, interval, num, pct, split_tuple, table

VIEW_NAMES = {"raw": "raw states", "normed": "as the next layer reads them (after its input norm)",
              "no_massive": "without the massive-activation channels"}


def disagreement_html(a: dict) -> str:
    """Where similarity and function disagree, and which one the decision followed."""
    d = a["decision"]
    rec = d["recommended"]
    views = a["similarity"]["views"]
    rows = []
    for row in d.get("similarity", []):
        view = row["view"]
        same = row["split"] == rec["split"]
        rows.append([
            e(VIEW_NAMES.get(view, view)), f'<code>{e(row["split"])}</code>', str(row["length"]),
            interval(row["repeat"]["delta_nll"]), interval(row["difference"]) if not same else "same block",
            num(views.get(view, {}).get("spearman_block_cka_vs_repeat_cost"), 2, True),
        ])
    notes = []
    for row in d.get("similarity", []):
        if row["split"] == rec["split"]:
            notes.append(f"similarity ({e(row['view'])}) picks the same block")
        else:
            diff = row["difference"]
            verdict = ("repeats more expensively" if diff["low"] > 0 else
                       "repeats more cheaply" if diff["high"] < 0 else "is not separable by repeat cost")
            notes.append(f"similarity ({e(row['view'])}) picks <code>{e(row['split'])}</code>, which "
                         f"{verdict} than the recommendation on the report text")
    header = ["similarity view", "its best split", "layers", "repeat &Delta;NLL (report)",
              "minus recommended (paired)", "Spearman: block CKA vs repeat cost"]
    return (
        '<p class="note" id="disagreement"><b>Which one the decision followed: function.</b> The split is '
        "chosen by the repeat cost; similarity explains the layers. " + "; ".join(notes) + ". Spearman: "
        "rank correlation over every valid split (selection text) between the mean CKA among the loop "
        "states and the repeat cost (negative: more similar blocks repeat more cheaply).</p>"
        + table(header, rows, left=2)
    )


def massive_html(a: dict, split: tuple[int, int]) -> str:
    """The massive-activation channels and tokens, and their ratio over depth."""
    m = a["measurements"]
    info = m.get("massive_activations") or {}
    shown = [(repr(t["text"]) if t["text"] is not None else t["id"], t["count"])
             for t in info.get("tokens", [])]
    tokens = ", ".join(f"<code>{e(text)}</code> ({count})" for text, count in shown) or "none"
    figs = []
    ratios = info.get("channel_ratio") or {}
    if ratios:
        series = [(f"channel {c}", array(v)) for c, v in list(ratios.items())[:6]]
        figs.append(plots.lines(series, "massive channels: max |h_c| / median |h|", per_layer=False,
                                split=split, ylabel="ratio", logy=True))
    massive = m.get("massive") or {}
    if massive.get("ratio_to_median") is not None:
        figs.append(plots.lines([("max |h| / median |h| (tokens used)", array(massive["ratio_to_median"]))],
                                "massive activations over depth", per_layer=False, split=split,
                                ylabel="ratio", logy=True))
    return (
        f'<p class="note" id="massive">Threshold: max |h_c| &ge; {num(info.get("threshold"), 0)} x the '
        f'median |h| of a state. Channels held out of the <i>no_massive</i> view (found on the first batch): '
        f'<code>{e(info.get("channels", []))}</code>; crossing the threshold anywhere: '
        f'<code>{e(info.get("channels_seen", []))}</code>. Tokens with a massive value: '
        f'{pct(info.get("token_share"))} of the measured tokens, most often {tokens}.</p>'
        f'<div class="figs">{"".join(figs)}</div>'
    )


def similarity_html(a: dict, split: tuple[int, int]) -> str:
    m = a["measurements"]
    sim = a["similarity"]
    figs = []
    matrices = [("raw", array(m["cka_debiased"]))] + [
        (view, array(values["cka"])) for view, values in (m.get("views") or {}).items()]
    for view, matrix in matrices:
        best = sim["views"].get(view, {}).get("best")
        figs.append(plots.state_heatmap(
            matrix, f"debiased CKA, {VIEW_NAMES.get(view, view)}", split, vmin=min(0.0, np.nanmin(matrix)),
            vmax=1.0, caption=f"Its exact search would pick {best}. Boxes: the recommended split's "
            "encoder / loop / decoder states."))
    figs.append(plots.state_heatmap(array(m["cka_biased"]), "biased linear CKA (raw, for comparison)", split,
                                    vmin=0.0, vmax=1.0, caption="Biased CKA is inflated when tokens per "
                                    "batch < hidden size."))
    surface = array(sim["surface"])
    if surface is not None:
        marks = {"similarity best": split_tuple(sim["best"]), "recommended": split}
        figs.append(plots.split_map(surface, "similarity objective over all (A, B), raw CKA", marks,
                                    label="score"))
    return (
        '<p class="note">Each row/column is a token state: 0 = embeddings output, s = output of layer s-1 '
        "(the last one before the final norm). The loop block A:B covers states A..B. The raw states are "
        "dominated by the massive-activation tokens below; the two other views remove them.</p>"
        f'<div class="figs">{"".join(figs)}</div>'
    )


def dynamics_html(a: dict, split: tuple[int, int]) -> str:
    m = a["measurements"]
    figs = []
    drift = [(n, array(m[k])) for n, k in (("raw", "drift"), ("mean-centred", "drift_centred"))
             if m.get(k) is not None]
    drift += [(view, array(values["drift"])) for view, values in (m.get("views") or {}).items()]
    if drift:
        figs.append(plots.lines(drift, "angular drift between consecutive states", per_layer=True,
                                split=split, ylabel="arccos(cos)/pi", caption="Shaded: the loop layers."))
    if m.get("rel_update") is not None:
        figs.append(plots.lines([("||h_{s+1}-h_s|| / ||h_s||", array(m["rel_update"]))],
                                "relative update norm", per_layer=True, split=split, ylabel="ratio"))
    if m.get("distance") is not None:
        figs.append(plots.state_heatmap(array(m["distance"]), "mean angular distance d(s, t)", split,
                                        vmin=0.0, cmap="cividis_r", caption="Gromov-style distance."))
    return f'<div class="figs">{"".join(figs)}</div>'


def readouts_html(a: dict, split: tuple[int, int]) -> str:
    m = a["measurements"]
    figs = []
    if m.get("lens_kl") is not None and np.isfinite(array(m["lens_kl"])).any():
        figs.append(plots.lines([("KL(final || lens)", array(m["lens_kl"])),
                                 ("entropy of lens", array(m["lens_entropy"]))],
                                "logit lens (final norm recomputed per state)", per_layer=False, split=split,
                                ylabel="nats"))
        figs.append(plots.lines([("top-1 agreement with the final prediction", array(m["lens_top1"]))],
                                "logit lens top-1", per_layer=False, split=split, ylabel="fraction"))
    probes = m.get("probes") or {}
    for task, result in probes.items():
        series = [(name, array(result[name])) for name in ("accuracy", "control", "selectivity")
                  if result.get(name) is not None]
        if series:
            title = f"probe: {task} token" if task != "position" else "probe: position"
            figs.append(plots.lines(series, title, per_layer=False, split=split, ylabel="accuracy",
                                    caption="control = same probe on a random relabelling per token type "
                                    "(Hewitt & Liang); selectivity = accuracy - control."))
    if not figs:
        return '<p class="note">No lens or probe measurements (turned off).</p>'
    note = "" if probes else '<p class="note">Probes were turned off (--no-probes).</p>'
    return f'{note}<div class="figs">{"".join(figs)}</div>'


def evidence_html(a: dict) -> str:
    sim = a["similarity"]
    rows = [[e(cp["signal"]), e(cp["description"]), f'<code>{e(cp["split"])}</code>', num(cp.get("distance")),
             "yes" if cp.get("agrees") else "no"] for cp in sim["change_points"]]
    cps = table(["signal", "curve", "change points", "layers off", "agrees"], rows, left=2) if rows else (
        '<p class="note">No usable 1-D curve.</p>')
    boot = sim["bootstrap"]
    if boot["resamples"]:
        counts = sorted(boot["counts"].items(), key=lambda kv: -kv[1])[:8]
        brows = [[f"<code>{e(k)}</code>", str(v), pct(v / boot["resamples"])] for k, v in counts]
        bhtml = (f'<p class="note">{boot["resamples"]} resamples of the measuring batches; raw CKA '
                 "recomputed and the exact similarity search re-run each time. A in "
                 f'{boot["start_interval"][0]}..'
                 f'{boot["start_interval"][1]}, B in {boot["end_interval"][0]}..{boot["end_interval"][1]} '
                 "(5%..95%).</p>" + table(["split", "resamples", "share"], brows))
    else:
        bhtml = '<p class="note">No bootstrap: fewer than two measuring batches.</p>'
    return ("<h3>Change points of the 1-D curves</h3>"
            '<p class="note">Exact two-change-point least-squares segmentation of each curve, mapped to A:B '
            "with the same state rule as the CKA search; a curve agrees with the recommendation when both "
            f"ends are within 2 layers.</p>{cps}<h3>Similarity search under resampling</h3>{bhtml}"
            f'<p class="note"><b>How the similarity search works.</b> {e(sim.get("rule", ""))}</p>')


def diagnostics_html(a: dict) -> str:
    m = a["measurements"]
    deb = array(m["cka_debiased"])
    bia = array(m["cka_biased"])
    off = ~np.eye(deb.shape[0], dtype=bool)
    rows = [
        ["tokens used (first position and padding excluded)", num(m.get("tokens_used"))],
        ["CKA minibatches", num(m.get("num_batches"))],
        ["tokens per minibatch (mean) / hidden size",
         f'{num(m["tokens_used"] / max(m["num_batches"], 1), 0)} / {num(m.get("hidden_size"))}'],
        ["sequence length", num(m.get("seq_len"))],
        ["non-finite values in the states", num(m.get("nan_count"))],
        ["NaN in the debiased CKA matrix", str(int(np.isnan(deb).sum()))],
        ["max |diag - 1| of debiased CKA", num(float(np.nanmax(np.abs(np.diag(deb) - 1.0))), 6)],
        ["mean off-diagonal CKA: debiased / biased",
         f"{num(float(np.nanmean(deb[off])))} / {num(float(np.nanmean(bia[off])))}"],
        ["lens tokens / probe tokens", f'{num(m.get("lens_tokens"))} / {num(m.get("probe_tokens"))}'],
    ]
    figs = ""
    if m.get("cka_with_bos") is not None:
        bos = array(m["cka_with_bos"])
        rows.append(["mean |CKA with BOS - CKA without| (off-diagonal)",
                     num(float(np.nanmean(np.abs(bos - deb)[off])))])
        figs = plots.state_heatmap(bos - deb, "CKA with the first position minus without", None,
                                   cmap="coolwarm", vmin=-1.0, vmax=1.0,
                                   caption="What keeping the BOS / attention-sink token would do.")
    massive = m.get("massive") or {}
    if massive.get("bos_max_abs") is not None and massive.get("max_abs") is not None:
        rows.append(["max |h| at the first position / elsewhere (largest over states)",
                     f'{num(float(np.nanmax(array(massive["bos_max_abs"]))), 1)} / '
                     f'{num(float(np.nanmax(array(massive["max_abs"]))), 1)}'])
    out = table(["diagnostic", "value"], [[e(k), v] for k, v in rows])
    return out + (f'<div class="figs">{figs}</div>' if figs else "")


def provenance_html(a: dict) -> str:
    p = a["provenance"]
    rows = [[e(k), f"<code>{e(v)}</code>"] for k, v in p.items() if not isinstance(v, dict)]
    for group in ("versions", "wall_time_s", "bootstrap_resamples"):
        for k, v in (p.get(group) or {}).items():
            shown = f"{v:.1f} s" if group == "wall_time_s" and isinstance(v, int | float) else v
            rows.append([e(f"{group}.{k}"), f"<code>{e(shown)}</code>"])
    return table(["field", "value"], rows, left=2)
