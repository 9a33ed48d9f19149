"""Golden tests: only assistant tokens, with their end-of-turn token, carry labels."""

import json

import pytest
from transformers import AutoTokenizer

from phitune.config import DataConfig, TaskConfig
from phitune.data.chat import IGNORE_INDEX, tokenize_conversation
from phitune.data.dataset import raise_on_errors, read_split, tokenize_file
from phitune.errors import PhituneError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "Goodbye."},
]

GOLDEN = {
    # Up to and including the end-of-turn token: the newline and final eos the template adds after
    # it are never generated (generation stops at <|end|>), so they are not trained.
    "phi3": ["Hello.<|end|>", "Goodbye.<|end|>"],
    "llama": ["Hello.<|eot_id|>", "Goodbye.<|eot_id|>"],
    "qwen2": ["Hello.<|im_end|>", "Goodbye.<|im_end|>"],
    "mistral": [" Hello.</s>", " Goodbye.</s>"],
}
END_OF_TURN = {"phi3": "<|end|>", "llama": "<|eot_id|>", "qwen2": "<|im_end|>", "mistral": "</s>"}


def trained_runs(tokenizer, example):
    """Decode each contiguous run of labelled tokens."""
    runs, current = [], []
    for tok, lab in zip(example.input_ids, example.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("arch", list(GOLDEN))
def test_only_assistant_turns_with_end_of_turn_are_trained(model_cache, arch):
    tok = AutoTokenizer.from_pretrained(model_cache(arch))
    example, truncated = tokenize_conversation(tok, CONVERSATION, max_length=512)
    assert not truncated
    assert trained_runs(tok, example) == GOLDEN[arch]
    eot = tok.convert_tokens_to_ids(END_OF_TURN[arch])
    assert eot in [lab for lab in example.labels if lab != IGNORE_INDEX]
    # Prompt tokens are in the input but never labelled.
    assert example.num_trained < len(example.input_ids)


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_weight_zero_turn_carries_no_labels(model_cache, arch):
    tok = AutoTokenizer.from_pretrained(model_cache(arch))
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0
    example, _ = tokenize_conversation(tok, messages, max_length=512)
    assert trained_runs(tok, example) == GOLDEN[arch][1:]
    # The weight-0 reply is still in the input, as context.
    assert "Hello." in tok.decode(example.input_ids)


def test_pad_is_not_eos(model_cache):
    for arch in GOLDEN:
        tok = AutoTokenizer.from_pretrained(model_cache(arch))
        assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_truncation_is_counted_and_empty_examples_dropped(tmp_path, tiny_phi3):
    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    long_user = {"role": "user", "content": "word " * 200}
    rows = [
        {"messages": CONVERSATION},
        {"messages": [long_user, {"role": "assistant", "content": "ok"}]},  # reply falls beyond max_length
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "long answer " * 100}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = tokenize_file(tok, str(path), max_length=64)
    assert ds.truncated == 2
    assert ds.dropped == [f"{path}:2"]
    assert len(ds.examples) == 2 and all(len(e.input_ids) <= 64 for e in ds.examples)


def test_every_problem_reported_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"messages": CONVERSATION})
        + "\n"
        + "{not json\n"
        + json.dumps({"prompt": "x"})
        + "\n"
        + json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": ""}]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}
        )
        + "\n"
    )
    split, _ = read_split(str(path), DataConfig(train=str(path)), TaskConfig())
    with pytest.raises(PhituneError) as exc:
        raise_on_errors(split)
    joined = "\n".join(exc.value.problems)
    assert f"{path}:2: invalid JSON" in joined
    assert f"{path}:3: missing key 'messages' (keys present: prompt)" in joined
    assert f"{path}:4: messages[0]: unknown role 'robot'" in joined
    assert f"{path}:4: messages[1]: empty content" in joined
    assert f"{path}:5: no assistant message" in joined
    assert f"{path}:6: messages[1]: 'weight' must be 0 or 1, got 2" in joined
    assert f"{path}:1" not in joined
