"""Find the dense FFN blocks of a model and read their weights in one uniform form.

Recognised shapes (what the error message lists when none is found):

- SwiGLU, Llama-style: a module with ``gate_proj``, ``up_proj``, ``down_proj`` (Linear) and ``act_fn``
  (Llama, Mistral, Qwen2, Gemma, SmolLM2, ...): ``down(act(gate(x)) * up(x))``;
- SwiGLU, fused: ``gate_up_proj`` (Linear, gate rows first) and ``down_proj`` (Phi-3 style);
- plain, BERT-style: a layer with ``intermediate.dense`` + ``intermediate.intermediate_act_fn`` and
  ``output.dense``: ``output.dense(act(intermediate.dense(x)))``;
- plain, GPT-2-style: a module with ``c_fc``, ``c_proj`` (transformers' Conv1D, weights stored [in, out])
  and ``act``: ``c_proj(act(c_fc(x)))`` (GPT-2, GPT-J-like MLPs);
- plain, OPT-style: a module with ``fc1``, ``fc2`` (Linear) and ``activation_fn`` (OPT's decoder layer,
  Phi's MLP): ``fc2(act(fc1(x)))``; the MoE block takes ``fc1``'s place, ``activation_fn`` and ``fc2``
  become identities, so whatever else the layer does (dropout, residual, norms) still runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LOOKED_FOR = ("gate_proj/up_proj/down_proj + act_fn (Llama-style SwiGLU)",
              "gate_up_proj/down_proj (Phi-3-style fused SwiGLU)",
              "intermediate.dense/output.dense (BERT-style)",
              "c_fc/c_proj + act (GPT-2-style)",
              "fc1/fc2 + activation_fn (OPT-style)")


@dataclass
class DenseFFN:
    """One dense FFN: ``w_down @ act(w_gate x) * (w_up x)`` (gated) or ``w_down @ act(w_up x)`` (plain)."""

    name: str  # qualified name of the module the MoE block replaces
    gated: bool
    w_up: torch.Tensor  # [I, H]
    w_down: torch.Tensor  # [H, I]
    act: Any
    w_gate: torch.Tensor | None = None  # [I, H] (gated only)
    b_up: torch.Tensor | None = None  # [I]
    b_gate: torch.Tensor | None = None  # [I]
    b_down: torch.Tensor | None = None  # [H]
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # the dense FFN itself: x [.., H] -> [.., H]
    install: Callable[[nn.Module], None] | None = None  # plain FFNs: put an MoE block in its place
    input_name: str = ""  # qualified name of the module whose input is the FFN's input

    @property
    def hidden(self) -> int:
        return self.w_up.shape[1]

    @property
    def intermediate(self) -> int:
        return self.w_up.shape[0]

    def parameters(self) -> int:
        return sum(t.numel() for t in (self.w_up, self.w_down, self.w_gate, self.b_up, self.b_gate, self.b_down)
                   if t is not None)

    def flops_per_token(self) -> int:
        return 2 * self.hidden * self.intermediate * (3 if self.gated else 2)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The intermediate activation [.., I] (what ``w_down`` multiplies)."""
        up = nn.functional.linear(x, self.w_up, self.b_up)
        if self.gated:
            return self.act(nn.functional.linear(x, self.w_gate, self.b_gate)) * up
        return self.act(up)


def _bias(linear: nn.Linear):
    return None if linear.bias is None else linear.bias.detach()


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m) -> bool:
    """transformers' Conv1D (a Linear whose weight is stored [in, out]), without importing transformers."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def find_ffns(model: nn.Module) -> list[DenseFFN]:
    """Every recognised dense FFN of ``model`` in module order; ValueError naming what was looked for if none."""
    found: list[DenseFFN] = []
    for name, mod in model.named_modules():
        spec = _as_ffn(name, mod)
        if spec is not None:
            found.append(spec)
    if not found:
        raise ValueError(f"{type(model).__name__} has no recognisable FFN blocks; looked for modules with "
                         + "; ".join(LOOKED_FOR))
    return found


def _as_ffn(name: str, mod: nn.Module) -> DenseFFN | None:
    get = mod._modules.get
    if all(_is_linear(get(a)) for a in ("gate_proj", "up_proj", "down_proj")) and callable(getattr(mod, "act_fn", None)):
        g, u, d = get("gate_proj"), get("up_proj"), get("down_proj")
        return DenseFFN(name, True, u.weight.detach(), d.weight.detach(), mod.act_fn, g.weight.detach(),
                        _bias(u), _bias(g), _bias(d), forward=mod.forward, input_name=name)
    if _is_linear(get("gate_up_proj")) and _is_linear(get("down_proj")):
        act = getattr(mod, "activation_fn", None) or getattr(mod, "act_fn", None)
        if act is None:
            return None
        gu, d = get("gate_up_proj"), get("down_proj")
        half = gu.out_features // 2
        b = _bias(gu)

        return DenseFFN(name, True, gu.weight.detach()[half:], d.weight.detach(), act, gu.weight.detach()[:half],
                        None if b is None else b[half:], None if b is None else b[:half], _bias(d),
                        forward=mod.forward, input_name=name)
    inter, out = get("intermediate"), get("output")
    if (inter is not None and out is not None and _is_linear(inter._modules.get("dense"))
            and _is_linear(out._modules.get("dense")) and callable(getattr(inter, "intermediate_act_fn", None))):
        u, d = inter.dense, out.dense

        def dense_forward(x, inter=inter, d=d):
            return d(inter(x))

        def install(new, mod=mod, out=out):
            # intermediate now returns the whole FFN output; output.dense becomes the identity, so the
            # layer's own dropout + LayerNorm(residual) still run as before.
            mod.intermediate = new
            out.dense = nn.Identity()

        return DenseFFN(name, False, u.weight.detach(), d.weight.detach(), inter.intermediate_act_fn, None,
                        _bias(u), None, _bias(d), forward=dense_forward, install=install,
                        input_name=f"{name}.intermediate" if name else "intermediate")
    return _as_plain_ffn(name, mod)


def _as_plain_ffn(name: str, mod: nn.Module) -> DenseFFN | None:
    """GPT-2-style (c_fc/c_proj Conv1D + act) and OPT-style (fc1/fc2 + activation_fn) FFNs."""
    get = mod._modules.get
    if _is_conv1d(get("c_fc")) and _is_conv1d(get("c_proj")) and callable(getattr(mod, "act", None)):
        fc, proj = get("c_fc"), get("c_proj")
        # Conv1D weights are [in, out]: transposed views give the [out, in] layout DenseFFN uses
        return DenseFFN(name, False, fc.weight.detach().t(), proj.weight.detach().t(), mod.act, None,
                        _bias(fc), None, _bias(proj), forward=lambda x, fc=fc, p=proj, a=mod.act: p(a(fc(x))),
                        input_name=name)
    act = getattr(mod, "activation_fn", None)
    if _is_linear(get("fc1")) and _is_linear(get("fc2")) and callable(act) and isinstance(act, nn.Module):
        fc1, fc2 = get("fc1"), get("fc2")

        def install(new, mod=mod):
            mod.fc1 = new
            mod.activation_fn = nn.Identity()
            mod.fc2 = nn.Identity()

        return DenseFFN(name, False, fc1.weight.detach(), fc2.weight.detach(), act, None, _bias(fc1), None,
                        _bias(fc2), forward=lambda x, a=fc1, f=act, b=fc2: b(f(a(x))), install=install,
                        input_name=f"{name}.fc1" if name else "fc1")
    return None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``model``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def install(model: nn.Module, spec: DenseFFN, new: nn.Module) -> None:
    """Put the MoE block ``new`` in the place of the FFN ``spec`` inside ``model``."""
    if spec.install is None:  # a self-contained FFN module: swap it in its parent
        replace_module(model, spec.name, new)
    else:
        spec.install(new)
