"""Packing with isolation: an example's logits and loss are the same packed or alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from phitune.data.batching import collate
from phitune.data.chat import IGNORE_INDEX, Example
from phitune.data.packing import pack_stream, pack_whole
from phitune.training.loss import token_loss


def _example(n: int, seed: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (n,), generator=g).tolist()
    return Example(ids, [IGNORE_INDEX] * 3 + ids[3:], f"ex{seed}")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_do_not_change_when_another_example_is_packed_beside_it(tiny_phi3, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3, attn_implementation=attn).eval()
    a, b = _example(20, 1), _example(33, 2)
    [packed] = pack_whole([a, b], max_length=64)
    assert packed.position_ids == list(range(33)) + list(range(20))  # longest first, positions restart
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([a.input_ids])).logits[0]
        batch = collate([packed], pad_id=0)
        assert "attention_mask" not in batch
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[
            0, 33:53
        ]
        # The control: the same row without restarting positions lets `a` see `b`.
        leaky = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits[0, 33:53]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (leaky - alone).abs().max() > 1e-3


def test_packed_loss_equals_the_sum_of_separate_losses(tiny_phi3):
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3).eval()
    examples = [_example(n, s) for s, n in enumerate((9, 30, 17, 12))]
    packed = pack_whole(examples, max_length=40)
    with torch.no_grad():
        separate = [token_loss(model, collate([e], 0)) for e in examples]
        together = token_loss(model, collate(packed, 0))  # rows padded: padding is one more segment
    assert together[1] == sum(n for _, n, _ in separate)  # no token predicts across a boundary
    torch.testing.assert_close(together[0], sum(loss for loss, _, _ in separate), atol=1e-4, rtol=1e-5)


def test_stream_packing_fills_sequences_and_never_trains_across_documents():
    docs = [Example(list(range(10, 10 + n)), list(range(10, 10 + n)), f"d{n}") for n in (7, 12, 5)]
    seqs = pack_stream(docs, max_length=10)
    assert [len(s.input_ids) for s in seqs] == [10, 10, 4]
    assert seqs[0].position_ids == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]  # doc 2 starts at 0
    assert seqs[1].position_ids == list(range(9)) + [0]  # doc 2's continuation restarts too
    # The first token of every segment is never a target of the previous segment's last token.
    assert seqs[0].labels[7] == IGNORE_INDEX and seqs[1].labels[0] == IGNORE_INDEX
    assert sum(s.num_trained for s in seqs) == 24 - 5  # 24 tokens, 5 segment starts
