"""The streamed safetensors writer against safetensors' own reader."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from phitune.training.streamed_safetensors import Slot, saved_as_is, write


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(7, 3, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "mask": torch.rand(3, 1, 2, generator=g) > 0.5,  # odd byte count: the next tensor is unaligned
        "positions": torch.arange(5, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(3, 4, generator=g).t(),  # not contiguous
    }


def _slots(tensors: dict[str, torch.Tensor]) -> list[Slot]:
    return [Slot(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def test_every_tensor_reads_back_bit_for_bit_with_the_metadata(tmp_path):
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    write(path, _slots(tensors), iter(tensors.items()), {"format": "pt"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize(
    "spoil",
    [
        lambda items: items[:-1],  # one tensor short
        lambda items: items + [("extra", torch.zeros(1))],  # one too many
        lambda items: [(n, t.double() if n == "positions" else t) for n, t in items],  # another dtype
        lambda items: [(n, t[:2] if n == "positions" else t) for n, t in items],  # another shape
        lambda items: items[1:2] + items[:1] + items[2:],  # out of order
    ],
)
def test_a_tensor_that_breaks_the_promised_header_stops_the_write(tmp_path, spoil):
    tensors = _tensors()
    with pytest.raises(ValueError):
        write(tmp_path / "model.safetensors", _slots(tensors), iter(spoil(list(tensors.items()))), {"format": "pt"})


def _tiny_llama(**extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        **extra,
    )
    return LlamaForCausalLM(config).eval()


def test_a_model_that_transformers_would_rename_on_saving_is_not_streamed():
    """The legacy renamings transformers attaches (LayerNorm.gamma and the like) touch no Llama
    name: streamed. A renaming that does touch one: left to save_pretrained."""
    from transformers.core_model_loading import WeightRenaming

    from phitune.training.engines import state_tensors

    model = _tiny_llama()
    slots = [Slot(n, tuple(t.shape), t.dtype) for n, t in state_tensors(model)]
    model._weight_conversions = [
        WeightRenaming(source_patterns=["LayerNorm.gamma"], target_patterns=["LayerNorm.weight"])
    ]
    assert saved_as_is(model, slots)
    model._weight_conversions = [WeightRenaming(source_patterns=["feed_forward"], target_patterns=["mlp"])]
    assert not saved_as_is(model, slots)


def test_a_tied_model_streamed_as_the_recipe_does_loads_back_with_the_same_logits(tmp_path):
    """The whole-model path of a sharded run, on one process: save_pretrained's config files,
    the streamed weights (each tied parameter under its first name only), from_pretrained."""
    from transformers import AutoModelForCausalLM

    from phitune.training.engines import state_tensors

    model = _tiny_llama(tie_word_embeddings=True)
    reference = tmp_path / "reference"
    model.save_pretrained(reference)
    entries = state_tensors(model)
    with safe_open(str(reference / "model.safetensors"), "pt") as f:
        assert sorted(n for n, _ in entries) == sorted(f.keys())  # lm_head.weight left to the tie

    streamed = tmp_path / "streamed"
    model.save_pretrained(streamed, state_dict={})
    assert not (streamed / "model.safetensors").exists()  # config files only: the weights are ours to write
    slots = [Slot(n, tuple(t.shape), t.dtype) for n, t in entries]
    assert saved_as_is(model, slots)
    write(streamed / "model.safetensors", slots, iter(entries), {"format": "pt"})
    assert sorted(p.name for p in streamed.iterdir()) == sorted(p.name for p in reference.iterdir())

    ids = torch.randint(0, 96, (2, 9))
    back = AutoModelForCausalLM.from_pretrained(streamed).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
