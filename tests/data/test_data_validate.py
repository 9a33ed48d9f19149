"""The malformed-data corpus: each defect gets its file:line message from `phitune data validate`,
exit 1, no traceback; `phitune train` stops on it before loading the model."""

import json

import pytest

from helpers import run_cli, write_config

OK_CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
OK_PC = {"prompt": "q", "completion": "a"}
OK_ALPACA = {"instruction": "Do it.", "output": "Done."}
OK_SHAREGPT = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
OK_PREF = {
    "input": {"messages": [{"role": "user", "content": "q"}]},
    "preferred_output": [{"role": "assistant", "content": "good"}],
    "non_preferred_output": [{"role": "assistant", "content": "bad"}],
}
OK_NER = {"tokens": ["Alice", "flew"], "tags": ["B-PER", "O"]}


def _jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# name -> (file name, content, extra args, expected text after "FILE:LINE: ")
CORPUS = {
    "invalid json": ("a.jsonl", _jsonl(OK_CHAT, "{oops"), [], "2: invalid JSON"),
    "row is not an object": ("a.jsonl", _jsonl(OK_CHAT, [1, 2]), [], "2: expected a JSON object"),
    "missing messages": (
        "a.jsonl",
        _jsonl(OK_CHAT, {"prompt": "x"}),
        [],
        "2: missing key 'messages' (keys present: prompt)",
    ),
    "messages not a list": (
        "a.jsonl",
        _jsonl(OK_CHAT, {"messages": "hi"}),
        [],
        "2: 'messages' must be a non-empty list",
    ),
    "unknown role": (
        "a.jsonl",
        _jsonl(OK_CHAT, {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}),
        [],
        "2: messages[0]: unknown role 'robot'; use one of system, user, assistant",
    ),
    "empty content": (
        "a.jsonl",
        _jsonl(OK_CHAT, {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}),
        [],
        "2: messages[0]: empty content",
    ),
    "content wrong type": (
        "a.jsonl",
        _jsonl(OK_CHAT, {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]}),
        [],
        "2: messages[0]: 'content' must be a string, got int",
    ),
    "no assistant turn": (
        "a.jsonl",
        _jsonl(OK_CHAT, {"messages": [{"role": "user", "content": "q"}]}),
        [],
        "2: no assistant message",
    ),
    "bad weight": (
        "a.jsonl",
        _jsonl(
            OK_CHAT,
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
        ),
        [],
        "2: messages[1]: 'weight' must be 0 or 1, got 2",
    ),
    "weight on a user turn": (
        "a.jsonl",
        _jsonl(
            OK_CHAT,
            {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
        ),
        [],
        "2: messages[0]: 'weight' is only allowed on assistant messages",
    ),
    "nothing trained": (
        "a.jsonl",
        _jsonl(
            OK_CHAT,
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
        ),
        [],
        "2: every assistant message has weight 0",
    ),
    "prompt/completion missing completion": (
        "p.jsonl",
        _jsonl(OK_PC, {"prompt": "q", "answer": "a"}),
        [],
        "2: missing key 'completion' (keys present: answer, prompt)",
    ),
    "prompt wrong type": (
        "p.jsonl",
        _jsonl(OK_PC, {"prompt": 3, "completion": "a"}),
        [],
        "2: 'prompt' must be a string, got int",
    ),
    "alpaca empty output": (
        "al.jsonl",
        _jsonl(OK_ALPACA, {"instruction": "Do it.", "output": ""}),
        [],
        "2: 'output' is empty",
    ),
    "alpaca input wrong type": (
        "al.jsonl",
        _jsonl(OK_ALPACA, {"instruction": "Do it.", "input": ["x"], "output": "ok"}),
        [],
        "2: 'input' must be a string, got list",
    ),
    "sharegpt unknown speaker": (
        "s.jsonl",
        _jsonl(OK_SHAREGPT, {"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        [],
        "2: conversations[0]: unknown 'from' 'robot'",
    ),
    "sharegpt empty value": (
        "s.jsonl",
        _jsonl(OK_SHAREGPT, {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]}),
        [],
        "2: conversations[0]: empty content",
    ),
    "preference wrong role": (
        "d.jsonl",
        _jsonl(OK_PREF, dict(OK_PREF, preferred_output=[{"role": "user", "content": "x"}])),
        [],
        "2: preferred_output[0]: role must be 'assistant', got 'user'",
    ),
    "preference missing rejected": (
        "d.jsonl",
        _jsonl(OK_PREF, {k: v for k, v in OK_PREF.items() if k != "non_preferred_output"}),
        [],
        "2: missing key 'non_preferred_output'",
    ),
    "preference prompt ends with the reply": (
        "d.jsonl",
        _jsonl(
            OK_PREF,
            dict(
                OK_PREF, input={"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
            ),
        ),
        [],
        "2: the prompt ends with an assistant message",
    ),
    "csv ragged row": (
        "c.csv",
        "text,label\nnice,positive\nbad,negative,extra\n",
        ["--task", "classification"],
        "3: 3 fields but the header has 2",
    ),
    "csv missing label": (
        "c.csv",
        "text,label\nnice,positive\nbad,\n",
        ["--task", "classification"],
        "3: 'label' must be a non-empty string or integer, got ''",
    ),
    "json syntax": (
        "j.json",
        '[\n {"prompt": "q", "completion": "a"},\n {"prompt": "q" "completion": "a"}\n]\n',
        [],
        "3: invalid JSON (Expecting ',' delimiter",
    ),
    "ner length mismatch": (
        "n.jsonl",
        _jsonl(OK_NER, {"tokens": ["Bob", "ran"], "tags": ["B-PER"]}),
        ["--task", "ner"],
        "2: 2 tokens but 1 tags; give one tag per token",
    ),
    "ner I- without B-": (
        "n.jsonl",
        _jsonl(OK_NER, {"tokens": ["Bob", "ran"], "tags": ["O", "I-PER"]}),
        ["--task", "ner"],
        "2: tags[1] = 'I-PER' does not continue an entity of that type; start it with B-PER",
    ),
    "ner span not whole words": (
        "n.jsonl",
        _jsonl(
            {"text": "Alice flew", "entities": [{"start": 0, "end": 5, "label": "PER"}]},
            {"text": "Bob ran", "entities": [{"start": 0, "end": 2, "label": "PER"}]},
        ),
        ["--task", "ner"],
        "2: entities[0]: span 0..2 ('Bo') does not cover whole words",
    ),
    "translation missing target": (
        "t.jsonl",
        _jsonl({"source": "a", "target": "b"}, {"source": "c"}),
        ["--task", "translation"],
        "2: missing key 'target'",
    ),
    "text empty": ("x.jsonl", _jsonl({"text": "some words"}, {"text": ""}), ["--format", "text"], "2: 'text' is empty"),
    "template field missing": (
        "tp.jsonl",
        _jsonl({"phrase": "hi", "tone": "happy"}, {"phrase": "hi"}),
        ["--format", "template", "--template", "{phrase} -> {tone}", "--completion-field", "tone"],
        "2: missing key 'tone'",
    ),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_defect_is_reported_with_file_and_line(name, tmp_path, capsys):
    fname, content, args, expected = CORPUS[name]
    path = tmp_path / fname
    path.write_text(content)
    code = run_cli("data", "validate", path, *args)
    out = capsys.readouterr()
    assert code == 1, out
    assert "Traceback" not in out.out + out.err
    assert f"error: {path}:{expected}" in out.out, out.out
    assert f"{path}:1:" not in out.out  # the good first row is not blamed


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 20
    assert {CORPUS[n][0].rsplit(".", 1)[1] for n in CORPUS} >= {"jsonl", "csv", "json"}


def test_warnings_and_statistics(tmp_path, tiny_phi3, capsys):
    rows = [{"text": f"review number {i} " + "very " * (i % 7), "label": "pos" if i % 2 else "neg"} for i in range(12)]
    rows += [rows[0], {"text": "once", "label": "rare"}]
    path = tmp_path / "c.jsonl"
    path.write_text(_jsonl(*rows))
    code = run_cli("data", "validate", path, "--task", "classification", "--model", tiny_phi3, "--max-length", "40")
    out = capsys.readouterr().out
    assert code == 0, out  # warnings alone do not fail
    assert f"warning: {path}:13: exact duplicate of {path}:1" in out
    assert "label(s) seen only once: rare" in out
    assert "over data.max_length=40; it is truncated" in out
    assert "14 examples" in out and "labels: neg 7, pos 6, rare 1" in out
    assert "tokens per example: min" in out and "p95" in out
    code = run_cli("data", "validate", path, "--task", "classification", "--json")
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 14 and report["duplicates"] == 1 and report["labels"]["rare"] == 1


def test_too_few_examples_is_a_warning(tmp_path, capsys):
    path = tmp_path / "few.jsonl"
    path.write_text(_jsonl(OK_CHAT))
    assert run_cli("data", "validate", path) == 0
    assert "only 1 example(s)" in capsys.readouterr().out


def test_train_stops_on_bad_data_before_loading_the_model(tmp_path, tiny_phi3, capsys):
    path = tmp_path / "c.csv"
    path.write_text("text,label\nnice,positive\nbad,negative,extra\n")
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, path, tmp_path / "out")
    raw = json.loads(cfg.read_text())
    raw["task"] = {"name": "classification", "head": True}
    cfg.write_text(json.dumps(raw))
    assert run_cli("train", cfg) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: 3 fields but the header has 2" in err and "Traceback" not in err
    assert "phitune data validate" in err
    assert not (tmp_path / "out").exists()


def test_undetectable_format_names_the_keys_and_the_fix(tmp_path, capsys):
    path = tmp_path / "x.jsonl"
    path.write_text(_jsonl({"question": "q", "reply": "a"}))
    assert run_cli("data", "validate", path) == 2
    err = capsys.readouterr().err
    assert "cannot tell the data format from the keys (question, reply); set data.format" in err


def test_validate_with_a_training_config(tmp_path, tiny_phi3, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model": str(tiny_phi3),
                "data": {"train": "unused", "max_length": 64},
                "task": {"name": "ner", "head": True},
            }
        )
    )
    path = tmp_path / "n.jsonl"
    path.write_text(_jsonl(OK_NER, {"tokens": ["Bob"], "tags": ["B-PER"]}))
    assert run_cli("data", "validate", path, "--config", cfg) == 0
    out = capsys.readouterr().out
    assert "format ner, task ner: 2 examples" in out and "labels: PER 2" in out and "tokens per example" in out


def test_preference_data_needs_the_dpo_objective(tmp_path, tiny_phi3, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(_jsonl(OK_PREF))
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, path, tmp_path / "out")
    assert run_cli("train", cfg) == 2
    assert "preference pairs train with method.objective: dpo" in capsys.readouterr().err
    chat = tmp_path / "chat.jsonl"
    chat.write_text(_jsonl(OK_CHAT))
    cfg = write_config(
        tmp_path / "c.yaml", tiny_phi3, chat, tmp_path / "out", method={"name": "lora", "objective": "dpo"}
    )
    assert run_cli("train", cfg) == 2
    assert "method.objective dpo needs preference rows" in capsys.readouterr().err


def test_generative_classification_as_raw_text_is_validated(tmp_path, tiny_phi3, capsys):
    """Labels of raw prompt/completion rows (data.chat_template: false) are counted like chat ones."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps(
            {"model": str(tiny_phi3), "data": {"train": "unused", "chat_template": False}, "task": "classification"}
        )
    )
    path = tmp_path / "c.csv"
    path.write_text("text,label\nnice,pos\ngood,pos\nbad,neg\nbad,neg\n")
    assert run_cli("data", "validate", path, "--config", cfg) == 0
    out = capsys.readouterr().out
    assert "labels: neg 2, pos 2" in out and "exact duplicate" in out
