"""One forward step of a decoder over a flat list of tokens from many sequences at once.

The step's tokens come from sequences at different positions (decodes of one token, prompt chunks
of many), each with its own adapter or none. Every linear layer runs once over all of them (the
base weights are read once per step, whatever the batch); each adapter's LoRA update is added to
its own contiguous slice of rows. Keys and values live in the engine's block pool (`kv.py`).

The layer arithmetic follows transformers' Llama, Mistral, Qwen2 and Phi-3 code and reuses their
modules where they carry no cache logic (RMSNorm, rotary embedding, embeddings, lm_head): the
weights are the loaded model's own, nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from phitune.errors import PhituneError
from phitune.inference.multilora import MultiLora, Stacks

if TYPE_CHECKING:
    from phitune.inference.kv import KVPool
    from phitune.inference.lora import LoraSet

ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3")


def unsupported(model: Any) -> str | None:
    """Why the engine cannot run `model` (None: it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"architecture {kind!r} (the engine runs {', '.join(ARCHITECTURES)})"
    if getattr(model, "is_loaded_in_8bit", False):
        return "8-bit quantized weights"
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"a model on {device} (the engine runs on the CPU; GPU serving is not built yet)"
    return None


def attention_shape(config) -> tuple[int, int, int]:
    """Query heads, key/value heads, head width of a model's config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


@dataclass
class Step:
    """What one forward runs. Rows are tokens, grouped by adapter (`groups`: adapter, start, end).

    Decoding sequences contribute one row each (`decode_rows`) and attend to `decode_slots` (their
    whole context, padded; `decode_valid` marks the real entries). A prompt chunk contributes
    `end - start` rows and attends to `slots` (its context so far plus itself, causally)."""

    tokens: torch.Tensor  # [T] token ids
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T] where each row's key and value go in the pool
    groups: list[tuple[LoraSet | None, int, int]]
    decode_rows: torch.Tensor | None = None  # [B]
    decode_slots: torch.Tensor | None = None  # [B, L]
    decode_key_positions: torch.Tensor | None = None  # [B, L]: position of each key; -1 pads
    prefills: list[Prefill] = field(default_factory=list)
    sample_rows: torch.Tensor | None = None  # [S] rows whose next-token logits are wanted


@dataclass
class Prefill:
    start: int
    end: int
    slots: torch.Tensor  # [L]: keys 0 .. last position of the chunk
    first_position: int


class Runner:
    """The model's decoder as a function of a `Step`: logits for the step's sample rows."""

    def __init__(self, model: Any, *, pack: bool = True) -> None:
        why = unsupported(model)
        if why:
            raise PhituneError(f"the inference engine cannot run this model: {why}")
        self.model = model
        self.config = config = model.config
        self.core = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.layers = list(self.core.layers)
        self.heads, self.kv_heads, self.head_dim = attention_shape(config)
        self.scaling = self.head_dim**-0.5
        self.dtype = next(self.core.parameters()).dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # 4-bit: activations in the compute dtype
            self.dtype = getattr(config, "torch_dtype", None) or torch.float32
        types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        self.windows = [
            (window if (types is None or types[i] == "sliding_attention") else None) for i in range(len(self.layers))
        ]
        from transformers.activations import ACT2FN

        self.act = ACT2FN[config.hidden_act]
        self.fused = config.model_type == "phi3"  # qkv_proj and gate_up_proj
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stacks = Stacks()
        self.pack = pack  # False: every layer through its own module (the reference the packed path is tested on)
        self.packed: dict[int, torch.Tensor] = {}
        self.joined: dict[int, tuple] = {}  # id(first layer) -> packed weight of several, their bias, sizes

    def prepare(self) -> None:
        """Pack the weights, on the thread that will run the forwards: oneDNN's packed weights made
        on one thread and used on another ran the matmuls much slower
        (docs/concepts/inference-engine.md)."""
        if not self.pack:
            return
        self.packed = packed(self.linear_names().values())
        if not self.fused:  # q/k/v and gate/up read the same input: one matmul each, as Phi-3's are
            for layer in self.layers:
                for group in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
                    self._join([getattr(group[0], n) for n in group[1]])

    def _join(self, modules: list) -> None:
        bases = [getattr(m, "base_layer", m) for m in modules]
        if not all(id(b) in self.packed for b in bases):
            return
        weight = torch.cat([b.weight.detach() for b in bases])
        bias = None
        if any(b.bias is not None for b in bases):
            bias = torch.cat([b.bias if b.bias is not None else weight.new_zeros(b.out_features) for b in bases])
        for b in bases:
            del self.packed[id(b)]
        joined = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        self.joined[id(bases[0])] = (joined, bias, [b.out_features for b in bases])

    @property
    def positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)

    def linear_names(self) -> dict[str, torch.nn.Module]:
        """The linear layers an adapter may target, by their name in the model ("model.layers.0.
        self_attn.q_proj"), unwrapped from PEFT's LoRA layers."""
        out = {}
        for layer in self.layers:
            for part in (layer.self_attn, layer.mlp):
                for child in part.children():
                    base = getattr(child, "base_layer", child)
                    if hasattr(base, "in_features"):
                        out[self._name(child)] = base
        out[self._name(self.model.lm_head)] = getattr(self.model.lm_head, "base_layer", self.model.lm_head)
        return out

    def _name(self, module: torch.nn.Module) -> str:
        name = self.names[id(module)]
        # A PeftModel's names start base_model.model.; an adapter's keys name the plain model.
        return name.removeprefix("base_model.model.")

    @torch.inference_mode()
    def forward(self, step: Step, pool: KVPool) -> torch.Tensor:
        x = self.core.embed_tokens(step.tokens).to(self.dtype)  # [T, hidden]
        lora = MultiLora(step.groups, len(step.tokens), self.stacks)
        cos, sin = self.core.rotary_emb(x, step.positions[None])
        cos, sin = cos[0], sin[0]  # [T, rotary dims]
        decode_mask = prefill_masks = None
        for i, layer in enumerate(self.layers):
            if decode_mask is None or self.windows[i] != self.windows[i - 1]:
                decode_mask, prefill_masks = self._masks(step, self.windows[i])
            h = layer.input_layernorm(x)
            x = x + self._attention(i, layer.self_attn, h, cos, sin, step, pool, lora, decode_mask, prefill_masks)
            h = layer.post_attention_layernorm(x)
            x = x + self._mlp(layer.mlp, h, lora)
        rows = x if step.sample_rows is None else x.index_select(0, step.sample_rows)
        rows = self.core.norm(rows)
        return self._linear(self.model.lm_head, rows, lora, step.sample_rows).float()

    def _linear(self, module, x: torch.Tensor, lora: MultiLora, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer over every row, then each row's adapter update. `rows`: x holds only these
        rows of the step (the output head's sample rows)."""
        base = getattr(module, "base_layer", module)
        y = self._base(base, x)
        if lora:
            if rows is None:
                lora.add(self._name(module), x, y, base.bias)
            else:
                lora.add_rows(self._name(module), x, y, rows, base.bias)
        return y

    def _linears(self, modules: list, x: torch.Tensor, lora: MultiLora) -> list[torch.Tensor]:
        """Several linear layers of one input (q/k/v, gate/up): one base matmul when they were
        joined, and one LoRA A matmul for all of them."""
        bases = [getattr(m, "base_layer", m) for m in modules]
        joined = self.joined.get(id(bases[0]))
        if joined is not None:
            weight, bias, sizes = joined
            ys = list(torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "").split(sizes, -1))
        else:
            ys = [self._base(b, x) for b in bases]
        if lora:
            lora.add_shared([self._name(m) for m in modules], x, ys, [b.bias for b in bases])
        return ys

    def _base(self, base, x: torch.Tensor) -> torch.Tensor:
        weight = self.packed.get(id(base))
        if weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, base.bias, "none", [], "")
        return base(x)

    def _mlp(self, mlp, h: torch.Tensor, lora: MultiLora) -> torch.Tensor:
        if self.fused:
            gate, up = self._linear(mlp.gate_up_proj, h, lora).chunk(2, dim=-1)
        else:
            gate, up = self._linears([mlp.gate_proj, mlp.up_proj], h, lora)
        return self._linear(mlp.down_proj, self.act(gate) * up, lora)

    def _attention(
        self, i, attn, h, cos, sin, step: Step, pool: KVPool, lora, decode_mask, prefill_masks
    ) -> torch.Tensor:
        T, D = h.shape[0], self.head_dim
        if self.fused:
            qkv = self._linear(attn.qkv_proj, h, lora)
            q, k, v = qkv.split([self.heads * D, self.kv_heads * D, self.kv_heads * D], dim=-1)
        else:
            q, k, v = self._linears([attn.q_proj, attn.k_proj, attn.v_proj], h, lora)
        q = _rotate(q.view(T, self.heads, D), cos, sin)
        k = _rotate(k.view(T, self.kv_heads, D), cos, sin)
        v = v.view(T, self.kv_heads, D)
        keys, values = pool.layer(i)
        keys.index_copy_(0, step.write_slots, k.to(keys.dtype))
        values.index_copy_(0, step.write_slots, v.to(values.dtype))
        out = torch.empty_like(q)
        if step.decode_rows is not None and step.decode_slots is not None:
            qd = q.index_select(0, step.decode_rows).unsqueeze(2)  # [B, H, 1, D]
            # index_select of the flat slots: ~5x faster than indexing with the 2-D tensor
            B, L = step.decode_slots.shape
            flat = step.decode_slots.view(-1)
            kd = keys.index_select(0, flat).view(B, L, self.kv_heads, D).transpose(1, 2)  # [B, Hkv, L, D]
            vd = values.index_select(0, flat).view(B, L, self.kv_heads, D).transpose(1, 2)
            o = _sdpa(qd, kd, vd, decode_mask, self.scaling)
            out.index_copy_(0, step.decode_rows, o.squeeze(2))
        for p, mask in zip(step.prefills, prefill_masks):
            qp = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, H, c, D]
            kp = keys.index_select(0, p.slots).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vp = values.index_select(0, p.slots).transpose(0, 1).unsqueeze(0)
            out[p.start : p.end] = _sdpa(qp, kp, vp, mask, self.scaling)[0].transpose(0, 1)
        return self._linear(attn.o_proj, out.reshape(T, self.heads * D), lora)

    def _masks(self, step: Step, window: int | None):
        """Boolean masks (True: may attend) for the decode group and each prompt chunk."""
        decode = None
        if step.decode_rows is not None and step.decode_key_positions is not None:
            keys = step.decode_key_positions  # [B, L]
            decode = keys >= 0
            if window:
                now = step.positions.index_select(0, step.decode_rows)[:, None]
                decode = decode & (now - keys < window)
            decode = decode[:, None, None, :]  # [B, 1, 1, L]
        chunks = []
        for p in step.prefills:
            queries = torch.arange(p.first_position, p.first_position + p.end - p.start)[:, None]
            keys = torch.arange(len(p.slots))[None, :]
            mask = keys <= queries
            if window:
                mask = mask & (queries - keys < window)
            chunks.append(mask[None, None])
        return decode, chunks


def packed(layers) -> dict[int, torch.Tensor]:
    """id(layer) -> its weight in oneDNN's blocked layout, for the plain bf16 linear layers on a CPU.
    nn.Linear hands oneDNN a plain weight and it re-lays it out on every call; packed once, the
    matmuls are faster with identical results (docs/concepts/inference-engine.md). A copy of the
    weights: the model keeps its own."""
    from phitune.hardware import cpu_has_native_bf16

    if not (torch.backends.mkldnn.is_available() and cpu_has_native_bf16()):
        return {}
    out = {}
    for layer in layers:
        if type(layer) is not torch.nn.Linear:
            continue
        w = layer.weight
        if w.dtype == torch.bfloat16 and w.device.type == "cpu":
            out[id(layer)] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first `cos.shape[-1]` dims of each head (all of them but Phi-4-mini's)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = n // 2
    turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rot = rot * cos + turned * sin
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


def _sdpa(q, k, v, mask, scale) -> torch.Tensor:
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
