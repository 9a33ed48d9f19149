"""phitune's CPU attention for short rows (phitune/attention.py) against transformers' SDPA path:
the same loss and gradients on padded, packed and sliding-window batches."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

import phitune.attention as phitune_attention
from phitune.attention import NAME, SHORT_KEYS, register

SMALL = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,  # grouped-query attention: three query heads per key/value head
    max_position_embeddings=512,
)


@pytest.fixture(autouse=True)
def _float32_too(monkeypatch):
    """In float32 phitune's attention hands over to SDPA (the faster there); here it computes
    float32 too, so that the two are compared at float32's precision."""
    monkeypatch.setattr(phitune_attention, "MATMUL_DTYPES", (torch.bfloat16, torch.float32))


def _pair(config):
    """The same weights twice: once with SDPA, once with phitune's attention."""
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    ours = copy.deepcopy(sdpa)
    ours.set_attn_implementation(register())
    assert ours.config._attn_implementation == NAME
    return sdpa.train(), ours.train()


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _padded(width: int, lengths: list[int]) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (len(lengths), width))
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed(width: int, segments: list[int]) -> dict:
    """One row holding several sequences: positions restart at each (the data's packing)."""
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (1, width))
    positions = torch.cat([torch.arange(n) for n in segments])[None]
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}


def _assert_same(sdpa, ours, batch, tol: float) -> None:
    loss_s, grads_s = _loss_and_grads(sdpa, batch)
    loss_o, grads_o = _loss_and_grads(ours, batch)
    assert abs(loss_s - loss_o) < tol, (loss_s, loss_o)
    for name, g in grads_s.items():
        assert torch.allclose(grads_o[name], g, atol=tol, rtol=tol), (name, (grads_o[name] - g).abs().max())


@pytest.mark.parametrize(
    "batch",
    [
        _padded(40, [40, 33, 12, 1]),  # right padding, one row of a single token
        _packed(48, [20, 17, 11]),
        _padded(SHORT_KEYS + 24, [SHORT_KEYS + 24, 90]),  # past the crossover: SDPA itself
    ],
    ids=["padded", "packed", "long"],
)
def test_short_rows_attention_gives_sdpa_loss_and_gradients(batch):
    sdpa, ours = _pair(LlamaConfig(**SMALL))
    _assert_same(sdpa, ours, batch, 1e-5)


def test_sliding_window_masks_are_kept():
    sdpa, ours = _pair(MistralConfig(**SMALL, sliding_window=8))
    batch = _padded(36, [36, 30])
    _assert_same(sdpa, ours, batch, 1e-5)
    full, _ = _pair(MistralConfig(**SMALL, sliding_window=None))
    assert abs(_loss_and_grads(full, batch)[0] - _loss_and_grads(ours, batch)[0]) > 1e-4  # the window mattered


def test_bf16_stays_within_bf16_rounding_of_sdpa():
    """In bf16 both round differently (SDPA's flash kernel vs matmuls and a float32 softmax): the
    loss within 1% and each gradient's direction within a few degrees."""
    sdpa, ours = _pair(LlamaConfig(**SMALL))
    sdpa, ours = sdpa.to(torch.bfloat16), ours.to(torch.bfloat16)
    batch = _padded(40, [40, 33, 12, 25])
    loss_s, grads_s = _loss_and_grads(sdpa, batch)
    loss_o, grads_o = _loss_and_grads(ours, batch)
    assert abs(loss_s.float() - loss_o.float()) / loss_s.float() < 0.01
    for name, g in grads_s.items():
        cos = torch.nn.functional.cosine_similarity(g.float().flatten(), grads_o[name].float().flatten(), dim=0)
        assert cos > 0.99, (name, cos)


def test_under_bf16_autocast_float32_projections_take_the_matmuls(monkeypatch):
    """LoRA updates kept in float32 hand attention float32 tensors under bf16 autocast: the
    matmul path runs all the same (SDPA is never called) and the loss stays within 1%."""
    import transformers.integrations.sdpa_attention as sdpa_module

    monkeypatch.setattr(phitune_attention, "MATMUL_DTYPES", (torch.bfloat16,))
    sdpa, ours = _pair(LlamaConfig(**SMALL))
    batch = _padded(40, [40, 33, 12, 25])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_s, _ = _loss_and_grads(sdpa, batch)
        monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", _never)
        loss_o, _ = _loss_and_grads(ours, batch)
    assert abs(loss_s.float() - loss_o.float()) / loss_s.float() < 0.01


def _never(*args, **kwargs):
    raise AssertionError("SDPA was called")


def test_training_on_a_cpu_uses_it_unless_the_config_names_another(tmp_path, tiny_phi3):
    from phitune.config import load_config
    from phitune.models import load_model

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')

    def attention(value: str) -> str:
        cfg = load_config(
            None, [f"model.name_or_path={tiny_phi3}", f"model.attn_implementation={value}", f"data.train={data}"]
        )
        return load_model(cfg, torch.device("cpu")).config._attn_implementation

    assert attention("auto") == NAME
    assert attention("sdpa") == "sdpa"
    assert attention("eager") == "eager"
