"""RMSNorm with fewer passes over the activations on a CPU, the same values bit for bit.

transformers' Llama-family RMSNorm computes ``w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``: in
bfloat16 that is a float32 island of six elementwise passes over a (B, T, H) tensor forward, and autograd's backward
of it about ten more (the casts back and forth, pow's and mean's gradients as full tensors, their sum). It saves
the float32 copy of x (4 bytes an element). On a CPU with native bfloat16 (AMX) the matmuls are fast enough that
these passes matter: one norm's forward and backward on (4, 256, 576) bfloat16 took 7.5-9.5 ms at one thread,
against 5.7-6.9 ms here (61 norms a step on SmolLM2; docs/performance.md).

``_RmsNorm`` computes the same float32 values in the same order (forward: the cast, pow, mean, rsqrt, the product
rounded once into x's dtype, the weight's product; backward: autograd's formulas of each of those ops, written
out: ``dp * r`` for the product, ``(-0.5 * dr) * r^3`` for rsqrt, ``dv / H`` for mean and ``2 h`` times it for
pow, added, rounded once), so outputs and input gradients equal transformers' bit for bit
(``tests/test_rmsnorm.py``). It saves x in its own dtype and the (B, T, 1) float32 factor, and recomputes the
float32 copy in backward. The weight must not train (LoRA and the other adapters freeze it); a norm whose weight
trains, a float32 input, or a call without gradient, runs transformers' own forward. CPU training swaps it in
(``training/session.py``), and the memory plan's meta probe of a CPU run counts what it saves (``plan/planner.py``).
"""

from __future__ import annotations

import torch
from torch import nn


class _RmsNorm(torch.autograd.Function):
    """w * round(h * rsqrt(mean(h^2) + eps)) with h = float32(x), and the input's gradient (see module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: ANN001
        h = x.float()  # (..., H) float32
        factor = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        # the product is computed in float32 and rounded once into x's dtype: transformers' .to(input_dtype)
        normed = torch.mul(h, factor, out=torch.empty_like(x))
        ctx.save_for_backward(x, weight, factor)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        x, weight, factor = ctx.saved_tensors
        grad_normed = (grad * weight).float()  # the weight's product, rounded in x's dtype, then the cast's backward
        h = x.float()
        grad_factor = (grad_normed * h).sum(-1, keepdim=True)  # (..., 1): the broadcast factor's gradient
        grad_variance = (-0.5 * grad_factor) * factor.pow(3)  # rsqrt's backward (the + eps passes it on)
        grad_square = 2.0 * (grad_variance / h.shape[-1])  # mean's backward, times pow's exponent (2 h = 2 * h exactly)
        # autograd adds the product's and pow's gradients of h, then casts back: here the sum is rounded once into x's
        # dtype (separate multiplies: a fused multiply-add would round differently)
        return torch.add(grad_normed * factor, h * grad_square, out=torch.empty_like(x)), None, None


def _rms_norm_classes() -> tuple[type, ...]:
    """transformers' RMSNorm classes whose forward is exactly the Llama one (weight * normed, eps inside rsqrt)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    return LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm


# In float32 there is no island (the casts return x itself), and autograd then adds the norm's two gradients of x to
# the residual stream's one by one: a sum of the two first, as here, rounds differently (float32's last bits).
HALF = (torch.bfloat16, torch.float16)


class _FewerPasses:
    """Mixed into a swapped RMSNorm class: ``_RmsNorm`` while gradients flow into a frozen-weight norm's
    half-precision input."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden_states.requires_grad and not self.weight.requires_grad \
                and hidden_states.dtype in HALF:
            return _RmsNorm.apply(hidden_states, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)  # type: ignore[misc]


_SWAPPED: dict[type, type] = {}


def use_cpu_rms_norm(model: nn.Module) -> int:
    """Give every Llama-family RMSNorm of ``model`` whose weight is frozen ``_RmsNorm``'s forward (its class is
    swapped for a subclass, so state dicts and the modules other code holds stay the same). Returns how many."""
    known = _rms_norm_classes()
    switched = 0
    for module in model.modules():
        cls = type(module)
        if cls in known and not module.weight.requires_grad:
            if cls not in _SWAPPED:
                _SWAPPED[cls] = type(cls.__name__, (_FewerPasses, cls), {"__module__": __name__})
            module.__class__ = _SWAPPED[cls]
            switched += 1
    return switched
