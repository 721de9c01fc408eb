"""The routing report written at the end of a run.

  <workdir>/routing_load.png   per-layer expert-load heat map (share of each
                               layer's assignments per expert)
  <workdir>/routing_report.md  loss, bits per byte, and per layer: MaxVio, load CV,
                               dropped share, experts per token, router entropy

Both read the routing metrics of the final evaluation.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np


def write_heatmap(path: str, loads: dict[str, np.ndarray]) -> None:
  # A Figure without pyplot: no backend is chosen for the process (a notebook
  # keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  layers = sorted(loads, key=lambda name: int(name.split("_")[-1]))
  share = np.stack([loads[l] / max(loads[l].sum(), 1e-9) for l in layers])
  fig = Figure(figsize=(max(4, 0.4 * share.shape[1] + 2), 0.5 * len(layers) + 1.5))
  ax = fig.subplots()
  image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
  ax.set_xlabel("expert")
  ax.set_ylabel("MoE layer")
  ax.set_yticks(range(len(layers)), layers)
  ax.set_title(f"share of assignments per expert (uniform = {1 / share.shape[1]:.3f})")
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_report(workdir: str, step: int, evaluation: dict[str, Any]) -> str:
  """Writes the heat map and the markdown summary; returns the markdown."""
  layers = evaluation.get("layers", {})
  lines = [f"# Routing report at step {step}", "",
           f"- validation loss: {evaluation['loss']:.4f} nats/token",
           f"- validation bits per byte: {evaluation['bits_per_byte']:.4f}",
           f"- evaluated tokens: {int(evaluation['tokens'])}", ""]
  if layers:
    has_mi = any("domain_expert_mi" in m for m in layers.values())
    lines += ["| layer | MaxVio | load CV | dropped share | experts per token | "
              "router entropy (nats) |" + (" MI(domain; expert) (nats) |" if has_mi else ""),
              "|---|---|---|---|---|---|" + ("---|" if has_mi else "")]
    for name in sorted(layers, key=lambda n: int(n.split("_")[-1])):
      m = layers[name]
      lines.append(f"| {name} | {m['max_violation']:.3f} | {m['load_cv']:.3f} | "
                   f"{m['dropped_share']:.4f} | {m['experts_per_token']:.3f} | "
                   f"{m['router_entropy']:.3f} |"
                   + (f" {m.get('domain_expert_mi', float('nan')):.4f} |" if has_mi else ""))
    write_heatmap(os.path.join(workdir, "routing_load.png"),
                  {name: np.asarray(m["load"], np.float64) for name, m in layers.items()})
    lines += ["", "![per-layer expert load](routing_load.png)"]
  else:
    lines.append("Dense model: no routing.")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "routing_report.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return text
