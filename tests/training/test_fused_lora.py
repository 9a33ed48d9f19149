"""The fused LoRA layer (phitune.methods.fused_lora) computes what PEFT's own layer computes: the same loss
and the same gradients, with and without dropout, and it falls back to PEFT where it does not apply."""

import copy

import pytest
import torch
from peft.tuners.lora import Linear as PeftLoraLinear

from phitune.config import parse_config
from phitune.methods.fused_lora import FusedLoraLinear, dropout, keep_mask
from phitune.models import apply_method, load_model, load_tokenizer

from helpers import DEMO_TRAIN


def _pair(model_dir, *, dropout=0.0, name="lora", precision="no"):
    """(PEFT's own LoRA model, phitune's fused one) with identical, non-zero adapter weights."""

    def build(fused):
        cfg = parse_config(
            {
                "model": str(model_dir),
                "method": {"name": name, "dropout": dropout, "target_modules": ["all-linear"]}
                | ({"fused": fused} if name == "lora" else {}),
                "data": str(DEMO_TRAIN),
            },
            source="test",
        )
        torch.manual_seed(0)
        model = load_model(cfg, torch.device("cpu"), precision)
        return apply_method(model, cfg, load_tokenizer(cfg.model))

    plain, fused = build(False), build(True)
    torch.manual_seed(1)
    with torch.no_grad():
        for (n, p), (n2, q) in zip(plain.named_parameters(), fused.named_parameters()):
            assert n == n2
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.05)
                q.copy_(p)
    return plain, fused


def _batch(vocab, rows=3, length=11):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab - 1, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _graph_nodes(loss):
    """The names of the autograd nodes behind LOSS."""
    seen, todo, names = set(), [loss.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions]
    return names


def _loss_and_grads(model, batch, seed=3):
    torch.manual_seed(seed)  # the same dropout masks on both sides
    model.zero_grad()
    loss = model(**batch).loss
    nodes = _graph_nodes(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum("LoraMatmul" in n for n in nodes)


class _PhituneDropout(torch.nn.Module):
    """PEFT's dropout module with phitune's mask (tested on its own below), so that both sides
    draw the same masks and the comparison is of the fused arithmetic."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p) if self.training else x


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_fused_lora_gives_peft_losses_and_gradients(tiny_phi3, rate):
    plain, fused = _pair(tiny_phi3, dropout=rate)
    if rate:
        for m in plain.modules():
            if isinstance(m, PeftLoraLinear):
                m.lora_dropout["default"] = _PhituneDropout(rate)
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    layers = [m for m in fused.modules() if isinstance(m, FusedLoraLinear)]
    assert len(layers) == sum(isinstance(m, PeftLoraLinear) for m in plain.modules()) > 0
    plain.train(), fused.train()
    batch = _batch(plain.config.vocab_size)
    loss_p, grads_p, fused_p = _loss_and_grads(plain, batch)
    loss_f, grads_f, fused_f = _loss_and_grads(fused, batch)
    assert fused_p == 0 and fused_f == len(layers)  # every adapted layer took the fused path
    assert torch.allclose(loss_p, loss_f, rtol=1e-5, atol=1e-5), (loss_p, loss_f)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) == 2 * len(layers)
    for n in grads_p:
        assert torch.allclose(grads_p[n], grads_f[n], rtol=1e-4, atol=1e-6), n
    # Held out (eval mode, no dropout): the same logits.
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, fused(**batch).logits, atol=1e-5)


def test_dropout_keeps_1_minus_p_unbiased_and_passes_gradients_through_the_mask():
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([1000, 1000]), 0.05, torch.device("cpu"))
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.95) < 4 * (0.05 * 0.95 / 1e6) ** 0.5
    assert keep_mask(torch.Size([7]), 0.0, torch.device("cpu")).all()
    by_slice = keep.view(-1, 4).float().mean(0)  # the four 16-bit slices of each random word alike
    assert ((by_slice - 0.95).abs() < 4 * (0.05 * 0.95 / 250_000) ** 0.5).all(), by_slice
    x = torch.randn(64, 300, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.3)
    torch.manual_seed(1)
    kept = keep_mask(x.shape, 0.3, x.device)
    scale = 2**15 / (2**15 - round(0.3 * 2**15))
    assert torch.equal(y, torch.where(kept, x * scale, 0.0))
    assert abs(y.sum().item() - x.sum().item()) < 0.05 * x.abs().sum().item()  # unbiased in expectation
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(g, kept * torch.tensor(scale, dtype=torch.float64))
    small = x[:3, :5].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(2), dropout(t, 0.3))[1], (small,))


def test_fused_lora_falls_back_where_it_does_not_apply(tiny_phi3):
    plain, fused = _pair(tiny_phi3)
    fused.eval()
    batch = _batch(plain.config.vocab_size)
    with torch.no_grad():
        with fused.disable_adapter():  # DPO's reference: the base model alone
            off = fused(**batch).logits
        base = copy.deepcopy(fused).merge_and_unload()  # merging uses PEFT's own code
        merged = base(**batch).logits
        on = fused(**batch).logits
        plain.eval()
        with plain.disable_adapter():
            plain_off = plain(**batch).logits
    assert torch.allclose(off, plain_off, atol=1e-6)
    assert torch.allclose(on, merged, atol=1e-4)
    assert not torch.allclose(on, off, atol=1e-3)
    # DoRA is a PEFT variant: never built fused.
    _, dora = _pair(tiny_phi3, name="dora")
    assert not any(isinstance(m, FusedLoraLinear) for m in dora.modules())


@pytest.mark.parametrize("precision", ["bf16", "no"])  # a bf16 base; an fp32 base under bf16 autocast
def test_under_bf16_the_update_stays_in_the_adapter_s_precision(tiny_phi3, precision):
    """bf16 would round a young adapter's small update away when adding it to the base output
    (PEFT's layer does); here the update is computed and added in fp32, so the layer's output is
    the bf16 base output plus the exact update, and training follows the fp32 gradients."""
    plain, fused = _pair(tiny_phi3, precision=precision)
    layer = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear))
    peft_layer = next(m for m in plain.modules() if isinstance(m, PeftLoraLinear))
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        for m in (layer, peft_layer):
            m.lora_B["default"].weight.mul_(1e-3)  # an update far below bf16's resolution of the output
    x = torch.randn(4, 7, layer.in_features, generator=torch.Generator().manual_seed(4)).to(
        layer.base_layer.weight.dtype
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base_out = layer.base_layer(x)
        ours, peft = layer(x), peft_layer(x)
    exact = (
        (x.float() @ layer.lora_A["default"].weight.t()) @ layer.lora_B["default"].weight.t() * layer.scaling["default"]
    )
    assert ours.dtype == torch.float32 and peft.dtype == torch.bfloat16
    assert torch.allclose(ours - base_out.float(), exact, rtol=1e-4, atol=1e-7)
    assert (peft.float() - base_out.float() - exact).abs().mean() > 0.3 * exact.abs().mean()  # mostly rounded away
    # An adapter that learned nothing gives exactly the base alone (DPO's reference, adapter disabled)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer.lora_B["default"].weight.zero_()
        zero = layer(x)
        with fused.disable_adapter():
            off = layer(x)
    assert torch.equal(zero, off)
    torch.manual_seed(5)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn_like(layer.lora_B["default"].weight) * 5e-5)

    batch = _batch(plain.config.vocab_size)
    plain.train(), fused.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_f, grads_f, _ = _loss_and_grads(fused, batch)
    reference, _ = _pair(tiny_phi3)  # fp32 throughout
    for (n, p), (_, q) in zip(reference.named_parameters(), fused.named_parameters()):
        if "lora_" in n:
            p.data.copy_(q.data)
    reference.train()
    loss_r, grads_r, _ = _loss_and_grads(reference, batch)
    assert torch.allclose(loss_f.float(), loss_r, rtol=2e-2), (loss_f, loss_r)
    for n in grads_r:
        cos = torch.nn.functional.cosine_similarity(grads_r[n].flatten(), grads_f[n].flatten().float(), dim=0)
        assert cos > 0.99, (n, float(cos))
