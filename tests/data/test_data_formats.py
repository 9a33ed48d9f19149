"""Round trips: every format yields the token ids and labels of its chat form; every file type the
same samples; splits, subsets and duplicate removal do what they say."""

import csv
import json

import pytest
from transformers import AutoTokenizer

from phitune.config import DataConfig, TaskConfig, parse_config
from phitune.data.dataset import load_training_data, read_split, tokenize_split
from phitune.samples import Chat, Plain
from phitune.tasks import TASKS

SYSTEM = "Be brief."
CHAT_FORMS = [
    # (format rows, equivalent chat messages)
    (
        {"prompt": "What is 2+2?", "completion": "4"},
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    ),
    (
        {
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello."}],
        },
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
    ),
    (
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        [{"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}],
    ),
    (
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": SYSTEM},
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
        ],
    ),
    (
        {
            "system": SYSTEM,
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye."},
            ],
        },
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ],
    ),
]


def _tokenized(tmp_path, name, rows, tok, data_cfg=None, task_cfg=None, suffix=".jsonl"):
    path = tmp_path / f"{name}{suffix}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_cfg = data_cfg or DataConfig(train=str(path))
    split, spec = read_split(str(path), data_cfg, task_cfg or TaskConfig())
    assert not split.errors, split.errors
    tokenize_split(split, tok, 512, spec)
    return split


@pytest.mark.parametrize("arch", ["phi3", "llama"])
@pytest.mark.parametrize("case", range(len(CHAT_FORMS)))
def test_each_format_equals_its_chat_form(tmp_path, model_cache, arch, case):
    tok = AutoTokenizer.from_pretrained(model_cache(arch))
    row, messages = CHAT_FORMS[case]
    converted = _tokenized(tmp_path, "fmt", [row], tok)
    chat = _tokenized(tmp_path, "chat", [{"messages": messages}], tok)
    assert converted.format != "chat" and chat.format == "chat"
    [a], [b] = converted.examples, chat.examples
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_preference_pairs_equal_the_chat_form_of_each_reply(tmp_path, tiny_phi3):
    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    prompt = [{"role": "user", "content": "Can I pay by card?"}]
    openai_row = {
        "input": {"messages": prompt},
        "preferred_output": [{"role": "assistant", "content": "Yes, of course."}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}],
    }
    trl_row = {"prompt": "Can I pay by card?", "chosen": "Yes, of course.", "rejected": "No."}
    for row in (openai_row, trl_row):
        [pair] = _tokenized(tmp_path, "pref", [row], tok).examples
        for side, reply in ((pair.chosen, "Yes, of course."), (pair.rejected, "No.")):
            [chat] = _tokenized(
                tmp_path, "chat", [{"messages": prompt + [{"role": "assistant", "content": reply}]}], tok
            ).examples
            assert side.input_ids == chat.input_ids and side.labels == chat.labels


def test_template_equals_raw_prompt_completion(tmp_path, tiny_phi3):
    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    templ = DataConfig(
        train="x", format="template", template="### Text: {phrase}\n### Tone: {tone}", completion_field="tone"
    )
    raw = DataConfig(train="x", chat_template=False)
    a = _tokenized(tmp_path, "t", [{"phrase": "I love it", "tone": "happy"}], tok, templ)
    b = _tokenized(tmp_path, "p", [{"prompt": "### Text: I love it\n### Tone: ", "completion": "happy"}], tok, raw)
    assert a.samples[0][1] == Plain("### Text: I love it\n### Tone: ", "happy")
    assert a.examples[0].input_ids == b.examples[0].input_ids and a.examples[0].labels == b.examples[0].labels
    # Only the completion and eos are trained.
    trained = [t for t, lab in zip(a.examples[0].input_ids, a.examples[0].labels) if lab != -100]
    assert tok.decode(trained) == "happy" + tok.eos_token


def test_file_types_give_the_same_samples(tmp_path):
    rows = [{"prompt": f"question {i}, with a comma", "completion": f"answer {i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d_ds"))
    expected = None
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "d_ds"):
        split, _ = read_split(str(tmp_path / name), DataConfig(train="x"), TaskConfig())
        assert not split.errors and split.format == "prompt_completion"
        samples = [s for _, s in split.samples]
        expected = expected or samples
        assert samples == expected, name
    # Lines are reported where the example starts.
    json_split, _ = read_split(str(tmp_path / "d.json"), DataConfig(train="x"), TaskConfig())
    assert [w.rsplit(":", 1)[1] for w, _ in json_split.samples] == ["2", "6", "10", "14", "18"]
    csv_split, _ = read_split(str(tmp_path / "d.csv"), DataConfig(train="x"), TaskConfig())
    assert [w.rsplit(":", 1)[1] for w, _ in csv_split.samples] == ["2", "3", "4", "5", "6"]


def test_task_prompts_are_the_documented_ones(tmp_path):
    """Golden prompts: evaluation (and users) rely on these exact words."""
    rows = [{"text": "Great coffee.", "label": "positive"}, {"text": "Cold tea.", "label": "negative"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    split, spec = read_split(str(tmp_path / "c.jsonl"), DataConfig(train="x"), TaskConfig(name="classification"))
    assert spec.labels == ["negative", "positive"] and spec.metrics == ["accuracy", "macro_f1", "valid_label"]
    assert split.samples[0][1] == Chat(
        [
            {
                "role": "user",
                "content": "Classify the text.\nAnswer with one of: negative, positive.\n\nText: Great coffee.",
            },
            {"role": "assistant", "content": "positive"},
        ]
    )
    ner_row = {
        "text": "Alice flew to Paris .",
        "entities": [{"start": 0, "end": 5, "label": "PER"}, {"start": 14, "end": 19, "label": "LOC"}],
    }
    (tmp_path / "n.jsonl").write_text(json.dumps(ner_row) + "\n")
    split, spec = read_split(str(tmp_path / "n.jsonl"), DataConfig(train="x"), TaskConfig(name="ner"))
    assert spec.labels == ["LOC", "PER"]
    assert json.loads(split.samples[0][1].messages[1]["content"]) == [
        {"text": "Alice", "type": "PER"},
        {"text": "Paris", "type": "LOC"},
    ]
    # The same sentence as tokens + tags gives the same sample.
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"tokens": ["Alice", "flew", "to", "Paris", "."], "tags": ["B-PER", "O", "O", "B-LOC", "O"]}) + "\n"
    )
    assert (
        read_split(str(tmp_path / "t.jsonl"), DataConfig(train="x"), TaskConfig(name="ner"))[0].samples[0][1]
        == split.samples[0][1]
    )
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"question": "Where?", "context": "On Mill Road.", "answer": "Mill Road"}) + "\n"
    )
    split, _ = read_split(str(tmp_path / "q.jsonl"), DataConfig(train="x"), TaskConfig(name="qa"))
    assert (
        split.samples[0][1].messages[0]["content"]
        == "Answer the question.\n\nContext: On Mill Road.\n\nQuestion: Where?"
    )
    (tmp_path / "tr.jsonl").write_text(json.dumps({"en": "The tea is hot.", "fr": "Le thé est chaud."}) + "\n")
    task = TaskConfig(
        name="translation", source_language="English", target_language="French", fields={"source": "en", "target": "fr"}
    )
    split, spec = read_split(str(tmp_path / "tr.jsonl"), DataConfig(train="x"), task)
    assert split.samples[0][1].messages == [
        {"role": "user", "content": "Translate from English to French.\n\nThe tea is hot."},
        {"role": "assistant", "content": "Le thé est chaud."},
    ]
    assert TASKS[task.name].spec(task, []).source_language == "English"


def test_duplicates_subset_and_validation_split(tmp_path, tiny_phi3, chat_files):
    lines = chat_files[0].read_text().splitlines()
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(lines[:40] + lines[:10]) + "\n")  # 10 exact duplicates
    raw = {
        "model": str(tiny_phi3),
        "data": {"train": str(path), "validation_split": 0.25, "subset": 0.5},
        "training": {"seed": 3},
    }
    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    data = load_training_data(parse_config(raw), tok)
    assert data.train.duplicates == 10
    assert len(data.validation_examples) == 10 and data.num_train_examples == 15  # 40 -> 10 held out -> half of 30
    again = load_training_data(parse_config(raw), tok)  # fixed seed: the same examples
    assert [e.source for e in again.train_examples] == [e.source for e in data.train_examples]
    held = {e.source for e in data.validation_examples}
    assert not held & {e.source for e in data.train_examples}
    raw["data"]["dedupe"] = False
    assert load_training_data(parse_config(raw), tok).train.duplicates == 10  # reported, kept
    assert len(load_training_data(parse_config(raw), tok).train.examples) == 50


def test_trains_from_parquet_and_a_datasets_directory(tmp_path, tiny_phi3, chat_files):
    from helpers import losses, run_cli, write_config

    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa

    rows = [json.loads(line) for line in chat_files[0].read_text().splitlines()]
    rows[0]["messages"][-1]["weight"] = 1  # the other rows' messages get weight None in Parquet: absent
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "train_ds"))
    traces = []
    for source in ("train.parquet", "train_ds"):
        out = tmp_path / f"out-{source}"
        cfg = write_config(tmp_path / "c.yaml", tiny_phi3, tmp_path / source, out, max_steps=5)
        assert run_cli("train", cfg) == 0
        traces.append(losses(out))
    # The same rows in another container train identically (the JSONL run is the reference).
    out = tmp_path / "out-jsonl"
    assert run_cli("train", write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], out, max_steps=5)) == 0
    assert traces[0] == traces[1] == losses(out)
