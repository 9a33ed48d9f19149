"""LoRA linear layers computed as one autograd node: y = x W^T + b + s (x_d A^T) B^T.

PEFT's `lora.Linear` runs the base layer, then `lora_B(lora_A(dropout(x))) * scaling` and adds the
two: on a CPU (or any memory-bound step) the scale and the add each read and write a whole
(tokens x out_features) tensor, forward and backward, in every adapted layer, and the backward
adds the LoRA branch's input gradient to the base's in one more pass. Here the LoRA update is
accumulated into the base output by the matmul itself (`addmm_`), the scale is applied to the
rank-r intermediate, and the backward accumulates both input gradients in one `addmm_`. The
arithmetic is the same as PEFT's (tests/training/test_fused_lora.py checks losses and gradients against it).

Under bf16 (autocast, or a bf16 base) with fp32 adapter weights, PEFT adds the update to the base
output in bf16, whose 8-bit mantissa rounds away most of a young adapter's small update (bf16
training then lands measurably worse than fp32: docs/benchmarks/speed-and-memory.md). Here the base matmul
stays in bf16 and the update is computed and added in the adapter's own precision (the layer's
output is then fp32), at bf16's speed.

Dropout on the LoRA input (`dropout` below) draws its keep-mask from 15-bit slices of 64-bit
random words: one generator call per four elements instead of `torch.nn.Dropout`'s one Bernoulli
draw per element, which on a CPU costs as much as the base matmul it feeds (PEFT applies it in every
adapted layer, seven times per decoder layer). The rate is rounded to a multiple of 2^-15 and the
kept values are scaled by the exact inverse of that rate, so the output is still unbiased.

The layer is a `peft.tuners.lora.Linear` subclass handed to PEFT through its custom-module
registry (`LoraConfig._register_custom_module`), so adapters keep PEFT's parameter names and
save and load as plain PEFT adapters. Anything this path does not cover (DoRA and other
variants, several active adapters, merged or disabled adapters, LoRA bias, mixed-batch
inference, a base weight that is sharded or of another dtype than the input) goes through
PEFT's own forward, unchanged.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from peft.tuners.lora import Linear as PeftLoraLinear

_DROPOUT_BITS = 15  # a 64-bit random word gives four 16-bit slices; its top bit is always 0, so 15 of each


def _dropped_slices(p: float) -> int:
    """How many of the 2^15 slice values drop an element: the rate p, rounded."""
    return round(p * 2**_DROPOUT_BITS)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask of `shape`, each element True with probability 1 - p (p rounded to a multiple
    of 2^-15), from the default generator of `device`."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    slices = words.view(torch.int16)[:n].view(shape)
    return (slices & (2**_DROPOUT_BITS - 1)) >= _dropped_slices(p)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.scale = 2**_DROPOUT_BITS / (2**_DROPOUT_BITS - _dropped_slices(p))
        ctx.save_for_backward(keep)
        return torch.where(keep, x * ctx.scale, 0.0)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, dy * ctx.scale, 0.0), None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with rate p, as `torch.nn.functional.dropout(x, p, training=True)` computes
    it, with the cheaper mask of `keep_mask` on a CPU (elsewhere torch's own kernel is fast)."""
    if x.device.type != "cpu":
        return torch.nn.functional.dropout(x, p, training=True)
    return _Dropout.apply(x, p)


class _LoraMatmul(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        x_dropped: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        same = x_dropped is x
        xd2 = x2 if same else x_dropped.reshape(-1, shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        h = xd2 @ a.t()
        y = torch.addmm(bias.to(x.dtype), x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(xd2, weight, a, b, h)
        ctx.scaling, ctx.shape, ctx.same = scaling, shape, same
        ctx.dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        xd2, weight, a, b, h = ctx.saved_tensors
        s, shape = ctx.scaling, ctx.shape
        dy2 = dy.reshape(-1, dy.shape[-1]).to(h.dtype)
        need_x, need_xd, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad  # the base weight is frozen
        dh = (dy2 @ b).mul_(s)  # rank-r wide: the scale costs nothing here
        dx = dxd = dbias = da = db = None
        if need_x or (ctx.same and need_xd):
            dx = dy2 @ weight
            if ctx.same:
                dx.addmm_(dh, a)
            dx = dx.reshape(shape)
        if need_xd and not ctx.same:
            dxd = (dh @ a).reshape(shape)
        if need_bias:
            dbias = dy2.sum(0).to(ctx.dtypes[2])
        if need_a:
            da = (dh.t() @ xd2).to(ctx.dtypes[0])
        if need_b:
            db = (dy2.t() @ h).mul_(s).to(ctx.dtypes[1])
        return dx, dxd, None, dbias, da, db, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _plain(weight: torch.Tensor) -> bool:
    """A whole, ordinary tensor: not ZeRO-3's empty placeholder, not a DTensor or a quantised one."""
    return type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.numel() > 0 and not hasattr(weight, "ds_id")


def _fusable_weight(weight: torch.Tensor, x: torch.Tensor) -> bool:
    # ZeRO-3 leaves an empty placeholder outside its gather hooks; DTensors (FSDP2, tensor
    # parallel) and quantised weights need their own kernels; another dtype than the input's, or
    # than the one autocast computes in (its matmuls would cast, the in-place addmm_ would not),
    # needs the casts PEFT's path does.
    if _compute_dtype(x) != x.dtype:
        return False
    return _plain(weight) and weight.dtype == x.dtype and not weight.requires_grad


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA linear layer with the fused forward and backward above where it applies."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        base = self.base_layer
        if (
            args
            or kwargs
            or adapter is None
            or self.merged
            or adapter not in self.lora_A
            or adapter in self.lora_variant
            or self.fan_in_fan_out
            or type(base) is not torch.nn.Linear
            or self.lora_B[adapter].bias is not None
        ):
            return super().forward(x, *args, **kwargs)
        if self.disable_adapters:
            # The base alone (DPO's reference), in the dtype the enabled path returns: an adapter
            # that has learned nothing yet gives exactly the reference's numbers.
            return base(x).to(self.lora_A[adapter].weight.dtype) if self._widens(x, adapter) else base(x)
        widens = self._widens(x, adapter)
        if not widens and not _fusable_weight(base.weight, x):
            return super().forward(x, *args, **kwargs)
        drop = self.lora_dropout[adapter]
        x_dropped = dropout(x, drop.p) if isinstance(drop, torch.nn.Dropout) and self.training and drop.p > 0 else x
        if widens:
            return self._update_in_adapter_precision(x, x_dropped, adapter)
        return _LoraMatmul.apply(
            x,
            x_dropped,
            base.weight,
            base.bias,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            float(self.scaling[adapter]),
        )

    def _lora_weights(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return cast(torch.Tensor, self.lora_A[adapter].weight), cast(torch.Tensor, self.lora_B[adapter].weight)

    def _widens(self, x: torch.Tensor, adapter: str) -> bool:
        """Whether the update is kept in the adapter's precision: its weights are wider than the
        dtype the layer computes in (bf16 autocast, a bf16 base), and whole tensors."""
        a, b = self._lora_weights(adapter)
        return _compute_dtype(x).itemsize < a.dtype.itemsize and _plain(a) and _plain(b)

    def _update_in_adapter_precision(self, x: torch.Tensor, x_dropped: torch.Tensor, adapter: str) -> torch.Tensor:
        """The base matmul in the narrow compute dtype, the LoRA update computed and added in the
        adapter weights' dtype (autocast would narrow it again: it is off for the update)."""
        a, b = self._lora_weights(adapter)
        y = self.base_layer(x)
        with torch.autocast(x.device.type, enabled=False):
            h = (x_dropped.to(a.dtype) @ a.t()) * float(self.scaling[adapter])  # the scale on the rank-r side
            return torch.addmm(y.to(a.dtype).flatten(0, -2), h.flatten(0, -2), b.t()).view(*y.shape[:-1], -1)


def register(peft_config: Any) -> None:
    """Have PEFT build FusedLoraLinear for the nn.Linear layers this LoraConfig adapts."""
    peft_config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
