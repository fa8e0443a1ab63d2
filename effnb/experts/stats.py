"""Routing statistics: how many tokens each expert gets, how unbalanced that is, what routing costs.

Works on effnb's MoE blocks and on transformers' MoE models: routers are found by shape, not by
model name, so Mixtral, Qwen2-MoE, OLMoE and their relatives are covered:

- effnb ``MoEFFN`` blocks (their ``last_router_logits`` / ``last_expert_index`` after each forward);
- transformers 5 top-k routers (``...TopKRouter``: a module with ``top_k`` and a ``[E, H]`` weight
  whose forward returns ``(router_logits, scores, expert_index)``);
- older layouts: a ``gate`` Linear(H, E) under a block with ``top_k`` or ``num_experts_per_tok``
  (its output are the logits; the top-k is recomputed from their softmax, as those models do).

Per layer: assignments per expert (they sum to tokens x top_k), max/mean load, coefficient of
variation (population std / mean), the Switch load-balancing loss (transformers' formula: E * sum
f_e P_e, with f_e assignments per token and P_e mean router probability; 1 x top_k at perfect
balance), mean router entropy (nats, and as a share of ln E).
"""

from __future__ import annotations

import html
import math

import torch

from .block import MoEFFN, switch_aux_loss

LOOKED_FOR = ("effnb MoE blocks (effnb.moe)", "transformers top-k routers (Mixtral, Qwen2-MoE, OLMoE: ...TopKRouter)",
              "a 'gate' Linear under a block with top_k / num_experts_per_tok")


def find_routers(model) -> list[tuple[str, torch.nn.Module, str, int, int]]:
    """(name, module, how, experts, top_k) for every router in ``model``; ValueError if none."""
    found = []
    inside_effnb: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, MoEFFN):
            found.append((name, mod, "effnb", mod.experts, mod.top_k))
            inside_effnb.add(name + ".router")
            continue
        if name in inside_effnb:
            continue
        weight = getattr(mod, "weight", None)
        k = getattr(mod, "top_k", None)
        if (type(mod).__name__.endswith("Router") and isinstance(k, int) and isinstance(weight, torch.Tensor)
                and weight.dim() == 2):
            found.append((name, mod, "router", weight.shape[0], k))
            continue
        gate = mod._modules.get("gate")
        k = getattr(mod, "top_k", None) or getattr(mod, "num_experts_per_tok", None)
        if isinstance(gate, torch.nn.Linear) and isinstance(k, int):
            found.append((f"{name}.gate" if name else "gate", gate, "gate-linear", gate.out_features, k))
    if not found:
        raise ValueError(f"{type(model).__name__} has no MoE routers; looked for " + "; ".join(LOOKED_FOR))
    return found


class _Recorder:
    def __init__(self, how: str, top_k: int):
        self.how, self.top_k = how, top_k
        self.logits: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []

    def __call__(self, module, args, output):
        if self.how == "effnb":
            logits, index = module.last_router_logits, module.last_expert_index
        elif isinstance(output, tuple) and len(output) >= 3:
            logits, index = output[0], output[2]
        else:
            logits = output[0] if isinstance(output, tuple) else output
            index = torch.softmax(logits.float(), -1).topk(self.top_k, dim=-1).indices
        self.logits.append(logits.detach().float().reshape(-1, logits.shape[-1]).cpu())
        self.index.append(index.detach().reshape(-1, index.shape[-1]).cpu())


def layer_stats(logits: torch.Tensor, index: torch.Tensor, experts: int) -> dict:
    """Statistics of one router over T tokens: logits [T, E], index [T, k]."""
    T, k = index.shape
    counts = torch.bincount(index.reshape(-1), minlength=experts).double()
    mean = counts.mean()
    probs = torch.softmax(logits.double(), -1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item()
    return {
        "tokens": T, "top_k": k, "experts": experts,
        "tokens_per_expert": [int(c) for c in counts.tolist()],
        "max_over_mean": (counts.max() / mean).item(),
        "coefficient_of_variation": (counts.std(unbiased=False) / mean).item(),
        "aux_loss": switch_aux_loss(logits, index, experts).item(),
        "router_entropy_nats": entropy,
        "router_entropy_share": entropy / math.log(experts) if experts > 1 else 0.0,
        "dead_experts": int((counts == 0).sum()),
    }


class MoEStats:
    """Routing statistics of one model over one text: per-layer numbers, token -> expert table, heatmaps."""

    def __init__(self, name: str, layers: list[dict], tokens: list[str], token_experts: list[list[list[int]]],
                 aux_loss_all_layers: float | None, text_note: str):
        self.name = name
        self.layers = layers
        self.tokens = tokens  # the first show_tokens tokens, decoded
        self.token_experts = token_experts  # [layer][token] -> expert ids (top_k)
        self.aux_loss_all_layers = aux_loss_all_layers
        self.text_note = text_note

    def to_dict(self) -> dict:
        return {"schema": "effnb.moe_stats", "schema_version": 1, "name": self.name, "text": self.text_note,
                "aux_loss_all_layers": self.aux_loss_all_layers, "layers": self.layers,
                "tokens": self.tokens, "token_experts": self.token_experts}

    def to_json(self, path: str | None = None, indent: int = 2) -> str:
        from ..report import to_json

        return to_json(self.to_dict(), path, indent)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in row.items() if k != "tokens_per_expert"} for row in self.layers]
                            ).set_index("layer")

    def _rows(self):
        head = ["layer", "tokens x k", "max/mean", "CV", "aux loss", "entropy (share of ln E)", "tokens per expert"]
        rows = [[r["layer"], f"{r['tokens']} x {r['top_k']}", f"{r['max_over_mean']:.2f}",
                 f"{r['coefficient_of_variation']:.3f}", f"{r['aux_loss']:.3f}",
                 f"{r['router_entropy_nats']:.3f} ({r['router_entropy_share']:.0%})",
                 " ".join(map(str, r["tokens_per_expert"]))] for r in self.layers]
        return head, rows

    def _footer(self) -> str:
        aux = f"; aux loss over all layers (as transformers sums it): {self.aux_loss_all_layers:.4f}" \
            if self.aux_loss_all_layers is not None else ""
        return (f"Routing of {self.name} over {self.text_note}, measured{aux}. Balanced: max/mean 1, CV 0, "
                "aux loss = top_k.")

    def to_text(self) -> str:
        head, rows = self._rows()
        table = [head, *[[str(c) for c in r] for r in rows]]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([*lines, self._footer()])

    __repr__ = to_text

    def _repr_html_(self) -> str:
        esc = html.escape
        head, rows = self._rows()
        th = "".join(f"<th>{esc(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td style='text-align:right'>{esc(str(c))}</td>" for c in r) + "</tr>"
                       for r in rows)
        tok = ""
        if self.tokens:
            cells = "".join(f"<th>{esc(repr(t)[1:-1])}</th>" for t in self.tokens)
            trs = "".join("<tr><th>" + esc(self.layers[li]["layer"]) + "</th>" + "".join(
                f"<td>{'/'.join(map(str, e))}</td>" for e in per_layer) + "</tr>"
                for li, per_layer in enumerate(self.token_experts))
            tok = (f"<details><summary>token &rarr; experts ({len(self.tokens)} tokens)</summary>"
                   f"<div style='overflow-x:auto'><table><tr><th>layer</th>{cells}</tr>{trs}</table></div></details>")
        return (f"<div class='effnb-moe-stats'><h4>MoE routing: {esc(self.name)}</h4><table><thead><tr>{th}</tr></thead>"
                f"<tbody>{body}</tbody></table>{tok}<p style='font-size:smaller;color:#666'>{esc(self._footer())}</p></div>")

    def figure(self):
        """Heatmap: share of the routing assignments each expert gets, per layer (1/E everywhere = balanced)."""
        import plotly.graph_objects as go

        z = [[c / max(1, r["tokens"] * r["top_k"]) for c in r["tokens_per_expert"]] for r in self.layers]
        fig = go.Figure(go.Heatmap(z=z, x=[f"e{i}" for i in range(len(z[0]))], y=[r["layer"] for r in self.layers],
                                   colorscale="Viridis", colorbar={"title": "share"}))
        fig.update_layout(title_text=f"Expert load per layer: {self.name}", height=max(260, 22 * len(z) + 120),
                          xaxis_title="expert", yaxis_title="layer", yaxis_autorange="reversed",
                          margin={"t": 50, "b": 40, "l": 120, "r": 10})
        return fig

    def token_figure(self):
        """Heatmap: the first-choice expert of each shown token in each layer."""
        import plotly.graph_objects as go

        z = [[e[0] for e in per_layer] for per_layer in self.token_experts]
        fig = go.Figure(go.Heatmap(z=z, x=list(range(len(self.tokens))), y=[r["layer"] for r in self.layers],
                                   text=[[repr(t)[1:-1] for t in self.tokens]] * len(z), colorscale="Turbo",
                                   hovertemplate="token %{text}<br>%{y}<br>expert %{z}<extra></extra>",
                                   colorbar={"title": "expert"}))
        fig.update_layout(title_text="First-choice expert per token", height=max(260, 22 * len(z) + 120),
                          xaxis_title="token position", yaxis_autorange="reversed",
                          margin={"t": 50, "b": 40, "l": 120, "r": 10})
        return fig

    def _ipython_display_(self) -> None:
        from ..report import display_all

        display_all(self._repr_html_(), [self.figure] + ([self.token_figure] if self.tokens else []))


def routing_stats(model, text=None, *, max_tokens: int = 512, window: int = 512, show_tokens: int = 48,
                  name: str | None = None) -> MoEStats:
    """Route ``text`` through ``model`` and gather ``MoEStats`` for every router found."""
    from ..data import resolve_text
    from ..models import find_tokenizer, model_kind, model_name
    from ..torch_utils import device_of, eval_mode
    from .sweep import text_ids

    routers = find_routers(model)
    tok = find_tokenizer(model)
    ids = text_ids(model, resolve_text(text), max_tokens)
    if ids.numel() == 0:
        raise ValueError("the text gives no tokens to route")
    recorders, hooks = [], []
    for _, mod, how, _, k in routers:
        rec = _Recorder(how, k)
        recorders.append(rec)
        hooks.append(mod.register_forward_hook(rec))
    limit = int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or window)
    window = min(window, limit)
    extra = {"use_cache": False} if model_kind(model) == "causal-lm" else {}
    device = device_of(model)
    try:
        with eval_mode(model), torch.inference_mode():
            for i in range(0, ids.numel(), window):
                model(input_ids=ids[i : i + window].unsqueeze(0).to(device), **extra)
    finally:
        for h in hooks:
            h.remove()
    layers, token_experts = [], []
    all_logits, all_index = [], []
    for (rname, _, how, experts, _), rec in zip(routers, recorders):
        logits, index = torch.cat(rec.logits), torch.cat(rec.index)
        layers.append({"layer": rname, "router": how} | layer_stats(logits, index, experts))
        token_experts.append(index[:show_tokens].tolist())
        all_logits.append(logits)
        all_index.append(index)
    same = len({lg.shape[-1] for lg in all_logits}) == 1 and len({ix.shape[-1] for ix in all_index}) == 1
    aux_all = switch_aux_loss(torch.cat(all_logits), torch.cat(all_index), all_logits[0].shape[-1]).item() if same else None
    shown = ids[:show_tokens].tolist()
    tokens = [tok.decode([t]) for t in shown] if tok is not None else [f"#{t}" for t in shown]
    source = "the built-in evaluation text" if text is None else "the given text"
    note = f"{ids.numel()} " + (f"tokens of {source}" if tok is not None else "fixed token ids (no tokenizer)")
    return MoEStats(name or model_name(model), layers, tokens, token_experts, aux_all, note)
