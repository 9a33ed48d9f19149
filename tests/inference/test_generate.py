"""Batched generation (left-padded, KV cache) gives the same greedy replies as one at a time."""

import json

from phitune.generate import complete_batch
from phitune.models import load_for_inference


def test_batched_greedy_equals_unbatched(tiny_phi3, chat_files):
    # The untrained model: long, arbitrary replies that never stop early, the hardest case for padding.
    model, tok = load_for_inference(str(tiny_phi3))
    rows = [json.loads(line)["messages"] for line in chat_files[1].read_text().splitlines()]
    conversations = [m[:-1] for m in rows][:12]  # prompts of different lengths, some multi-turn
    assert len({len(str(c)) for c in conversations}) > 3
    one_by_one = [complete_batch(model, tok, [c], max_new_tokens=24)[0] for c in conversations]
    batched = complete_batch(model, tok, conversations, max_new_tokens=24, batch_size=5)
    assert all(len(r) > 10 for r in one_by_one)
    assert batched == one_by_one
