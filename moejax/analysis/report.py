"""The analysis report of one run: every measure over its traces, as figures,
a markdown page, plots and a coloured text sample.

  figures(traces)          JSON-able dict of every measure (the last checkpoint's
                           routing, and how routing moved over the checkpoints)
  write(directory, traces) analysis.json, analysis.md, *.png, routing.html

`traces` are one run's traces of the same tokens at several checkpoints, in
step order (moejax.analyze makes them). The measures are those of
moejax.analysis; each figure names its module.
"""
from __future__ import annotations

import html
import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from moejax.analysis import (affinity, balance, consistency, diversity, drops, fluctuation,
                             specialization)
from moejax.analysis.trace import RoutingTrace

SEGMENT_LENGTHS = (4, 16, 64)   # s of SRP and SCH, kept where a sequence is that long
SCH_SEGMENT = 16                # s of the SCH curve
CAPACITY_FACTORS = (1.0, 1.25)  # re-applied to the trace for the drop-by-position figure
RESAMPLES = 500                 # bootstrap resamples over sequences


def _segments(trace: RoutingTrace) -> list[int]:
  longest = int(np.max(np.bincount(trace.sequence_ids))) if trace.num_tokens else 0
  return [s for s in SEGMENT_LENGTHS if s <= longest] or [max(longest, 1)]


def _interval(i: consistency.Interval) -> dict[str, float]:
  return {"value": float(i.value), "low": float(i.low), "high": float(i.high)}


def layer_figures(trace: RoutingTrace, layer: int) -> dict[str, Any]:
  """Every single-trace measure of one MoE layer."""
  e = trace.num_experts
  width = trace.experts.shape[2]
  out: dict[str, Any] = {
      "load": balance.expert_load(trace, layer).tolist(),
      "max_violation": _interval(balance.max_violation_interval(trace, layer, RESAMPLES)),
      "load_cv": balance.load_cv(trace, layer),
      "experts_per_token": float(np.mean(np.sum(trace.selected[layer], axis=-1))),
      "token_expert_mi": specialization.token_expert_mutual_information(trace, layer),
      "majority_share": specialization.majority_expert_share(trace, layer)._asdict(),
      "distinct_combinations": diversity.distinct_combinations(trace, layer)._asdict(),
      "observed_drop_share": drops.observed_drop_rate_by_position(trace, layer).overall,
  }
  if trace.has_domains:
    out["domain_expert_mi"] = specialization.domain_expert_mutual_information(trace, layer)
  out["srp"] = {str(s): _interval(consistency.srp_interval(trace, layer, s, RESAMPLES))
                for s in _segments(trace)}
  s = min(SCH_SEGMENT, max(_segments(trace)))
  ms = list(range(1, e + 1))
  curve = consistency.sch_curve(trace, layer, s, ms)
  knee = consistency.sch_knee(ms, curve)
  out["sch"] = {"s": s, "m": ms, "hit_rate": curve.tolist(), "knee": knee,
                "knee_over_k": None if knee is None else knee / max(width, 1),
                "at_2k": _interval(consistency.sch_interval(
                    trace, layer, s, min(2 * width, e), RESAMPLES))}
  out["drops_by_position"] = {}
  for factor in CAPACITY_FACTORS:
    rates = drops.drop_rate_by_position(trace, layer, factor)
    out["drops_by_position"][str(factor)] = {"overall": rates.overall,
                                             "by_position": _nan_to_none(rates.by_position)}
  return out


def _nan_to_none(values: np.ndarray) -> list[Optional[float]]:
  return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, float)]


def figures(traces: Sequence[RoutingTrace]) -> dict[str, Any]:
  """Every measure: the last trace's per layer and across layers, and the
  movement between consecutive traces (fluctuation, balance)."""
  if not traces:
    raise ValueError("figures: no traces")
  last = traces[-1]
  names = last.layer_names
  out: dict[str, Any] = {
      "meta": dict(last.meta), "num_experts": last.num_experts, "tokens": last.num_tokens,
      "steps": [t.meta.get("step") for t in traces],
      "layers": {name: layer_figures(last, i) for i, name in enumerate(names)},
      "distinct_paths": diversity.distinct_paths(last)._asdict(),
      "affinity": {}}
  for i in range(last.num_layers - 1):
    pair = f"{names[i]}->{names[i + 1]}"
    out["affinity"][pair] = {
        **affinity.conditional_entropy(last, i)._asdict(),
        "matrix": affinity.layer_affinity(last, i).tolist()}
  out["coactivation"] = {name: affinity.coactivation(last, i).tolist()
                         for i, name in enumerate(names)}
  if len(traces) > 1:
    moves = []
    for a, b in zip(traces[:-1], traces[1:]):
      f = fluctuation.routing_fluctuation(a, b)
      moves.append({"from": a.meta.get("step"), "to": b.meta.get("step"),
                    "top1_changed": f.top1_changed.tolist(), "jaccard": f.jaccard.tolist()})
    out["fluctuation"] = moves
    history = balance.balance_over_checkpoints(traces)
    out["balance_over_checkpoints"] = {
        "steps": history.steps.tolist(), "max_violation": history.max_violation.tolist(),
        "load_cv": history.load_cv.tolist(), "router_entropy": history.router_entropy.tolist(),
        "load": [[balance.expert_load(t, i).tolist() for i in range(t.num_layers)]
                 for t in traces]}
  return _plain(out)


def _plain(value):
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.ndarray):
    return _plain(value.tolist())
  if isinstance(value, (np.floating, float)):
    return float(value) if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


# ----------------------------------------------------------------------------- report


def write(directory: str, traces: Sequence[RoutingTrace], config: Optional[dict] = None,
          decode: Optional[Callable[[np.ndarray], str]] = None) -> str:
  """Writes analysis.json, analysis.md, the plots and routing.html into
  `directory`; returns the path of analysis.md."""
  os.makedirs(directory, exist_ok=True)
  data = figures(traces)
  with open(os.path.join(directory, "analysis.json"), "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1)
  plots = _plots(directory, data)
  if decode is not None:
    _write_html(os.path.join(directory, "routing.html"), traces[-1], decode)
  path = os.path.join(directory, "analysis.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(_markdown(data, plots, config, decode is not None))
  return path


def _fmt(x, digits=3) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_interval(i: dict) -> str:
  return f"{_fmt(i['value'])} [{_fmt(i['low'])}, {_fmt(i['high'])}]"


def _markdown(data: dict, plots: dict[str, str], config: Optional[dict],
              has_html: bool) -> str:
  meta, layers = data["meta"], data["layers"]
  names = list(layers)
  lines = [f"# Routing analysis: {meta.get('router', '?')} on {meta.get('dataset')}/"
           f"{meta.get('split')}", "",
           f"{data['tokens']} evaluation tokens, the same at every checkpoint; "
           f"{data['num_experts']} experts per MoE layer; checkpoints traced: "
           f"{', '.join(map(str, data['steps']))}. The tables give the last checkpoint "
           f"(step {data['steps'][-1]}). Intervals: 95% percentile bootstrap over sequences "
           f"({RESAMPLES} resamples).", ""]
  if config is not None:
    moe = config.get("moe", {})
    lines += [f"Model: top_k {moe.get('top_k')}, capacity factor "
              f"{moe.get('capacity_factor')}, shared experts "
              f"{moe.get('num_shared_experts', 0)}, granularity {moe.get('granularity', 1)}.",
              ""]
  lines += ["## Load and specialisation", "",
            "| layer | MaxVio | load CV | experts/token | dropped | I(token id; expert) | "
            "I(domain; expert) | majority share (baseline) | distinct sets |",
            "|---|---|---|---|---|---|---|---|---|"]
  for name in names:
    m = layers[name]
    maj = m["majority_share"]
    lines.append(
        f"| {name} | {_fmt_interval(m['max_violation'])} | {_fmt(m['load_cv'])} | "
        f"{_fmt(m['experts_per_token'], 2)} | {_fmt(m['observed_drop_share'])} | "
        f"{_fmt(m['token_expert_mi'])} | {_fmt(m.get('domain_expert_mi'))} | "
        f"{_fmt(maj['share'])} ({_fmt(maj['baseline'])}) | "
        f"{m['distinct_combinations']['count']} |")
  paths = data["distinct_paths"]
  lines += ["", "MI in nats (plug-in estimate, biased upwards on few tokens). Majority share: "
            "share of assignments to the K experts a token id uses most, against the K "
            "experts used most overall (OpenMoE's context-independent specialisation). "
            f"Distinct expert paths across layers: {paths['count']} "
            f"({_fmt(paths['share'])} of tokens).", "",
            "## Local routing consistency", "",
            "SRP(s): the best F1 of predicting each window's experts from the window alone; "
            "SCH(s, m): hit rate of the best cache of m experts per window of s tokens "
            "(\"Not All Models Suit Expert Offloading\", 2025).", ""]
  segs = list(next(iter(layers.values()))["srp"])
  lines += ["| layer | " + " | ".join(f"SRP({s})" for s in segs) +
            " | SCH(s, 2K) | SCH knee m (m/K) |",
            "|---|" + "---|" * (len(segs) + 2)]
  for name in names:
    m = layers[name]
    knee = m["sch"]["knee"]
    lines.append(f"| {name} | " + " | ".join(_fmt_interval(m["srp"][s]) for s in segs) +
                 f" | {_fmt_interval(m['sch']['at_2k'])} | "
                 f"{'n/a' if knee is None else knee} ({_fmt(m['sch']['knee_over_k'], 1)}) |")
  lines += ["", f"Knee: the smallest m whose hit rate closes 90% of the gap from m = 1 to 1 "
            f"(s = {next(iter(layers.values()))['sch']['s']}).", ""]
  if "sch" in plots:
    lines += [f"![SCH curve]({plots['sch']})", ""]
  if data["affinity"]:
    lines += ["## Inter-layer affinity (ExFlow)", "",
              "| layers | H(next \\| this) | H(next) | information |", "|---|---|---|---|"]
    for pair, a in data["affinity"].items():
      lines.append(f"| {pair} | {_fmt(a['conditional'])} | {_fmt(a['baseline'])} | "
                   f"{_fmt(a['information'])} |")
    lines += ["", "Entropies in nats; information = H(next) - H(next \\| this), 0 when the "
              "layers route independently.", ""]
  for key, title in (("affinity", "Affinity"), ("coactivation", "Co-activation")):
    if key in plots:
      lines += [f"![{title}]({plots[key]})", ""]
  lines += ["## Drops by position under capacity", "",
            "The trace's routing with capacity re-applied per sequence (position "
            "priority: first choices of every token before second choices, earlier tokens "
            "first), as OpenMoE's drop-towards-the-end.", "",
            "| layer | " + " | ".join(f"dropped at factor {c}" for c in CAPACITY_FACTORS) +
            " | last quarter / first quarter at 1.0 |", "|---|" + "---|" * (
                len(CAPACITY_FACTORS) + 1)]
  for name in names:
    d = layers[name]["drops_by_position"]
    lines.append(f"| {name} | " + " | ".join(_fmt(d[str(c)]["overall"])
                                            for c in CAPACITY_FACTORS) +
                 f" | {_fmt(_end_ratio(d[str(CAPACITY_FACTORS[0])]['by_position']), 2)} |")
  if "drops" in plots:
    lines += ["", f"![Drops by position]({plots['drops']})"]
  lines.append("")
  if "fluctuation" in data:
    lines += ["## Over the checkpoints", "",
              "| from -> to | " + " | ".join(f"{n} top-1 changed" for n in names) +
              " | mean Jaccard distance |", "|---|" + "---|" * (len(names) + 1)]
    for move in data["fluctuation"]:
      lines.append(f"| {move['from']} -> {move['to']} | " +
                   " | ".join(_fmt(v) for v in move["top1_changed"]) +
                   f" | {_fmt(float(np.mean(move['jaccard'])))} |")
    hist = data["balance_over_checkpoints"]
    lines += ["", "Balance over training (\"Three Phases of Expert Routing\", 2025: a surge, "
              "stabilisation, then relaxation):", "",
              "| step | " + " | ".join(f"{n} MaxVio | {n} load CV | {n} router entropy"
                                      for n in names) + " |",
              "|---|" + "---|" * (3 * len(names))]
    for i, step in enumerate(hist["steps"]):
      cells = [f"{_fmt(hist['max_violation'][i][y])} | {_fmt(hist['load_cv'][i][y])} | "
               f"{_fmt(hist['router_entropy'][i][y])}" for y in range(len(names))]
      lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, title in (("fluctuation", "Fluctuation"), ("load", "Load over checkpoints")):
      if key in plots:
        lines += [f"![{title}]({plots[key]})", ""]
  else:
    lines += ["One checkpoint traced: fluctuation and balance over training need two or "
              "more (train.keep_checkpoints).", ""]
  if has_html:
    lines += ["A text sample coloured by expert, one row per MoE layer: "
              "[routing.html](routing.html).", ""]
  return "\n".join(lines)


def _end_ratio(by_position: list) -> Optional[float]:
  values = np.array([np.nan if v is None else v for v in by_position], float)
  quarter = max(len(values) // 4, 1)
  first, last = np.nanmean(values[:quarter]), np.nanmean(values[-quarter:])
  if not np.isfinite(first) or not np.isfinite(last) or first <= 0:
    return None
  return float(last / first)


def _plots(directory: str, data: dict) -> dict[str, str]:
  """PNG plots; {} where matplotlib is not installed. Figures are drawn without
  pyplot, so no backend is chosen for the process (a notebook keeps its inline
  plots)."""
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  layers, out = data["layers"], {}
  names = list(layers)

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(directory, f"{name}.png"), dpi=90)
    out[name] = f"{name}.png"

  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for name in names:
    sch = layers[name]["sch"]
    ax.plot(sch["m"], sch["hit_rate"], marker="o", label=name)
  ax.set(xlabel="cache size m (experts)", ylabel=f"SCH(s={sch['s']}, m)",
         title="Segment cache hit rate")
  ax.legend()
  save(fig, "sch")

  def heatmaps(matrices: dict[str, list], title: str, xlabel: str, ylabel: str, name: str):
    if not matrices:
      return
    n = len(matrices)
    fig = Figure(figsize=(3.6 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (label, matrix) in zip(axes[0], matrices.items()):
      image = ax.imshow(np.asarray(matrix, float), cmap="viridis", vmin=0)
      ax.set(title=label, xlabel=xlabel, ylabel=ylabel)
      fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    save(fig, name)

  heatmaps({k: v["matrix"] for k, v in data["affinity"].items()},
           "P(expert at next layer | expert at this layer)", "next expert", "this expert",
           "affinity")
  heatmaps(data["coactivation"], "Share of tokens routed to both experts", "expert",
           "expert", "coactivation")

  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  factor = str(CAPACITY_FACTORS[0])
  for name in names:
    values = [np.nan if v is None else v
              for v in layers[name]["drops_by_position"][factor]["by_position"]]
    ax.plot(np.arange(len(values)), values, label=name)
  ax.set(xlabel="position in sequence", ylabel="dropped share",
         title=f"Drops by position, capacity factor {factor}")
  ax.legend()
  save(fig, "drops")

  if "fluctuation" in data:
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    steps = [m["to"] for m in data["fluctuation"]]
    for i, name in enumerate(names):
      ax.plot(steps, [m["top1_changed"][i] for m in data["fluctuation"]], marker="o",
              label=name)
    ax.set(xlabel="step", ylabel="top-1 changed since previous checkpoint",
           title="Routing fluctuation")
    ax.legend()
    save(fig, "fluctuation")
    hist = data["balance_over_checkpoints"]
    heatmaps({name: np.asarray(hist["load"], float)[:, i] for i, name in enumerate(names)},
             "Per-expert load over checkpoints", "expert", "checkpoint", "load")
  return out


PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000",
           "#aaffc3", "#808000", "#ffd8b1", "#000075", "#a9a9a9", "#ffe119")


def _write_html(path: str, trace: RoutingTrace, decode: Callable[[np.ndarray], str],
                tokens: int = 200) -> None:
  """The first sequence's first `tokens` tokens, one row per MoE layer, each
  token's background the colour of its top-1 expert (title: all its experts)."""
  index = trace.sequences()[0][:tokens]
  rows = []
  for layer, name in enumerate(trace.layer_names):
    cells = []
    for t in index:
      experts = [int(e) for e in trace.experts[layer, t] if e >= 0]
      text = html.escape(decode(trace.token_ids[t:t + 1])).replace(" ", "&nbsp;")
      text = text.replace("\n", "&#8629;") or "&#9633;"
      colour = PALETTE[experts[0] % len(PALETTE)] if experts else "#ffffff"
      cells.append(f'<span style="background:{colour}" title="experts {experts}">{text}</span>')
    rows.append(f"<tr><th>{html.escape(name)}</th><td><code>{''.join(cells)}</code></td></tr>")
  legend = " ".join(f'<span style="background:{PALETTE[e % len(PALETTE)]}">&nbsp;{e}&nbsp;'
                    f"</span>" for e in range(trace.num_experts))
  meta = trace.meta
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"<!doctype html><meta charset='utf-8'><title>Routing</title>"
            f"<h3>{html.escape(str(meta.get('router')))} at step {meta.get('step')}: each "
            f"token coloured by its top-1 expert (hover: all its experts)</h3>"
            f"<p>experts: {legend}</p><table>{''.join(rows)}</table>")
