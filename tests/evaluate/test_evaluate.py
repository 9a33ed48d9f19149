"""phitune eval / compare end to end: fine-tunes beat their base on held-out data, reports are
written, training-time task metrics agree with `phitune eval`, leakage is found, bad input fails
with one line."""

import json
import sys

import pytest
import torch

from phitune.tasks import GENERATIVE_TASKS, TASKS, TaskSpec, score, scoring
from phitune.tasks.classification import canonical_label

from helpers import REPO, TOY_EXAMPLE_FLAGS, run_cli, write_config


def _train_example(name: str, tiny_phi3, out, *extra) -> None:
    assert (
        run_cli(
            "train",
            REPO / "examples" / name / "config.yaml",
            "--set",
            f"model.name_or_path={tiny_phi3}",
            "--set",
            f"output_dir={out}",
            "--set",
            "training.precision=fp32",
            *TOY_EXAMPLE_FLAGS,
            *extra,
        )
        == 0
    )


@pytest.mark.parametrize("example,primary", [("classification", "accuracy"), ("translation", "chrf")])
def test_fine_tune_beats_the_untrained_base_in_compare(example, primary, tiny_phi3, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    _train_example(example, tiny_phi3, run, "--max-steps", "60" if example == "classification" else "200")
    report = tmp_path / "report"
    assert run_cli("compare", tiny_phi3, run, "--names", "base,tuned", "--output", report) == 0
    comparison = json.loads((report / "comparison.json").read_text())
    base, tuned = (m["metrics"] for m in comparison["models"])
    assert comparison["primary_metric"] == primary
    assert tuned[primary] > base[primary] + (0.3 if primary == "accuracy" else 30.0), (base, tuned)
    assert comparison["deltas"]["tuned"][primary] == pytest.approx(tuned[primary] - base[primary])
    assert (report / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report / "report.md").read_text()
    assert "![before and after](chart.png)" in md and f"| {primary} |" in md and "Δ tuned" in md
    assert "data:image/png;base64," in (report / "report.html").read_text()
    out = capsys.readouterr().out
    assert primary in out and "report.md" in out


def test_task_metric_during_training_matches_phitune_eval_of_the_best_checkpoint(tiny_phi3, tmp_path, monkeypatch):
    """Generative classification: accuracy on generated answers at each evaluation, the best kept
    in OUT/best, and `phitune eval OUT/best` scores exactly what training recorded for it."""
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    _train_example(
        "classification",
        tiny_phi3,
        run,
        "--set",
        "task.head=false",
        "--set",
        "method.target_modules=[all-linear, lm_head]",
        "--set",
        "training.keep_best=true",
        "--set",
        "training.eval_every=10",
        "--set",
        "training.eval_generate=1000",
        "--max-steps",
        "40",
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    assert len(evals) == 4 and all("eval_macro_f1" in r and "eval_valid_label" in r for r in evals)
    best = json.loads((run / "best" / "best.json").read_text())
    top = max(evals, key=lambda r: r["eval_accuracy"])  # the first of equals: later ties do not replace it
    assert best == {"step": top["step"], "metric": "accuracy", "value": top["eval_accuracy"]}
    assert json.loads((run / "run.json").read_text())["best"]["step"] == top["step"]
    assert run_cli("eval", run / "best", "--output", tmp_path / "eval") == 0
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["task"] == "classification" and scored["examples"] == 60
    assert scored["metrics"]["accuracy"] == pytest.approx(best["value"])
    assert scored["metrics"]["loss"] == pytest.approx(top["eval_loss"], rel=1e-4)
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 60 and {"where", "prompt", "reference", "prediction"} <= set(predictions[0])


def test_head_run_eval_reports_per_class_and_confusion(tiny_phi3, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    _train_example("ner", tiny_phi3, run, "--set", "task.head=true", "--max-steps", "30")
    assert run_cli("eval", run, "--json") == 0
    scored = json.loads((run / "eval" / "metrics.json").read_text())
    trained = json.loads((run / "run.json").read_text())["eval"]
    # The head's entity F1 from `phitune eval` equals the one the training loop computed.
    assert scored["metrics"]["entity_f1"] == pytest.approx(trained["entity_f1"])
    cls = tmp_path / "cls"
    _train_example("classification", tiny_phi3, cls, "--max-steps", "20")
    assert run_cli("eval", cls) == 0
    metrics = json.loads((cls / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics["per_class"]) == {"negative", "neutral", "positive"}
    assert sum(sum(row.values()) for row in metrics["confusion"].values()) == 60
    assert metrics["accuracy"] == pytest.approx(json.loads((cls / "run.json").read_text())["eval"]["accuracy"])


def test_leakage_is_counted_in_eval_and_warned_in_training(tiny_phi3, tmp_path, caplog):
    rows = [{"source": f"The cup {i} is hot.", "target": f"La tasse {i} est chaude."} for i in range(12)]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    leaked = rows[:3] + [{"source": rows[3]["source"], "target": "Autre chose."}]
    val.write_text("".join(json.dumps(r) + "\n" for r in leaked + [{"source": "New.", "target": "Nouveau."}]))
    cfg = write_config(
        tmp_path / "c.json", tiny_phi3, train, tmp_path / "out", validation=val, max_steps=2, eval_every=2
    )
    raw = json.loads(cfg.read_text())
    raw["task"] = {"name": "translation", "source_language": "English", "target_language": "French"}
    cfg.write_text(json.dumps(raw))
    with caplog.at_level("WARNING", logger="phitune"):
        assert run_cli("train", cfg) == 0
    assert any(
        "leakage: 3 of 5 eval examples" in r.message and "1 more share their input" in r.message for r in caplog.records
    )
    assert json.loads((tmp_path / "out" / "run.json").read_text())["leakage"]["exact"] == 3
    assert run_cli("eval", tmp_path / "out", "--output", tmp_path / "ev") == 0
    leak = json.loads((tmp_path / "ev" / "metrics.json").read_text())["leakage"]
    assert (leak["checked"], leak["exact"], leak["same_input"]) == (5, 3, 1)


def test_multiple_choice_by_log_likelihood(tiny_phi3, tmp_path):
    from phitune.evaluate.choice import choice_examples, evaluate_choices
    from phitune.models import load_for_inference

    rows = [
        {"question": "What colour is milk?", "choices": ["white", "black", "green"], "answer": 0},
        {"question": "Is coffee hot?", "choices": ["yes", "no"], "answer": "no"},
        {
            "question": "Pick the fruit.",
            "mc1_targets": {"choices": ["apple", "stone"], "labels": [1, 0]},
            "mc2_targets": {"choices": ["apple", "pear", "stone"], "labels": [1, 1, 0]},
        },
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = load_for_inference(str(tiny_phi3))
    values, n = evaluate_choices(model, tok, str(data), batch_size=2)
    assert n == 3

    def loglik(question, choice):  # one full forward per choice, summed by hand
        ex = choice_examples(tok, question, [choice])[0]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ex.input_ids])).logits[0].log_softmax(-1)
        return sum(float(logp[i - 1, t]) for i, (t, lab) in enumerate(zip(ex.input_ids, ex.labels)) if lab != -100)

    right = []
    for row, answer in ((rows[0], 0), (rows[1], 1)):
        ll = [loglik(row["question"], c) for c in row["choices"]]
        right.append(max(range(len(ll)), key=ll.__getitem__) == answer)
    assert values["accuracy"] == pytest.approx(sum(right) / 2)
    ll = [loglik("Pick the fruit.", c) for c in ("apple", "pear", "stone")]
    p = [torch.tensor(x).exp().item() for x in ll]
    assert values["mc2"] == pytest.approx((p[0] + p[1]) / sum(p), rel=1e-4)
    mc1 = [loglik("Pick the fruit.", c) for c in ("apple", "stone")]
    assert values["mc1"] == float(mc1[0] > mc1[1])


def test_bad_eval_input_gives_one_line_errors(tiny_phi3, tmp_path, capsys):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": 5}) + "\n")
    assert run_cli("eval", tiny_phi3, "--data", bad, "--task", "multiple_choice") == 2
    err = capsys.readouterr().err
    assert "mc.jsonl:1" in err and "'answer' must be the index" in err and "Traceback" not in err
    assert run_cli("eval", tiny_phi3, "--data", bad) == 2
    assert "no task.json" in capsys.readouterr().err
    assert run_cli("eval", tiny_phi3) == 2
    assert "pass --data FILE" in capsys.readouterr().err
    assert run_cli("compare", tiny_phi3, tiny_phi3, "--data", bad, "--task", "qa") == 2
    assert "distinct names" in capsys.readouterr().err


@pytest.mark.slow  # 20-60 s on 2 cores: in the slow tier, to keep the default suite within budget
def test_harness_bridge_runs_a_local_task_or_says_how_to_install(tiny_phi3, tmp_path, monkeypatch, capsys):
    data = tmp_path / "cafe.jsonl"
    data.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"question": "What colour is milk?", "choices": ["white", "black"], "answer": 0},
                {"question": "Is tea a drink?", "choices": ["yes", "no"], "answer": 0},
            ]
        )
    )
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "cafe.yaml").write_text(
        f"task: cafe_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    )
    args = (
        "eval",
        tiny_phi3,
        "--harness",
        "cafe_mc",
        "--harness-include",
        tmp_path / "tasks",
        "--output",
        tmp_path / "h",
    )
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        assert run_cli(*args) == 2
        assert "pip install 'phitune[harness]'" in capsys.readouterr().err
        return
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert run_cli(*args) == 0
    results = json.loads((tmp_path / "h" / "harness.json").read_text())
    assert 0.0 <= results["cafe_mc"]["acc,none"] <= 1.0
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    assert run_cli(*args) == 2
    assert "pip install 'phitune[harness]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("Positive.", "positive"),
        (" NEGATIVE ", "negative"),
        ("neutral!", "neutral"),
        ("positive-ish", "positive-ish"),
        ("", ""),
    ],
)
def test_generated_labels_are_matched_leniently(answer, expected):
    assert canonical_label(answer, ["negative", "neutral", "positive"]) == expected


def test_score_by_task():
    spec = TaskSpec(name="ner", labels=["PER", "LOC"])
    ref = json.dumps([{"text": "Ada", "type": "PER"}, {"text": "Oslo", "type": "LOC"}])
    got = score(spec, [json.dumps([{"text": "Ada", "type": "PER"}]), "not json"], [ref, ref])
    # 1 of 1 predicted entities right, 1 of 4 reference entities found.
    assert got["entity_precision"] == 1.0 and got["entity_recall"] == 0.25 and got["entity_f1"] == pytest.approx(0.4)
    assert got["valid_json"] == 0.5
    qa = score(TaskSpec(name="qa"), ["The Mill Road", "7"], ["Mill Road", "7 am"])
    assert qa["exact_match"] == 0.5 and qa["token_f1"] == pytest.approx((1.0 + 2 / 3) / 2)


@pytest.mark.parametrize("task", sorted(GENERATIVE_TASKS))
def test_scored_names_are_what_score_returns(task):
    spec = TaskSpec(name=task, labels=["a", "b"])
    ref = json.dumps([{"text": "x", "type": "a"}]) if task == "ner" else "a"
    assert tuple(scoring.headline(score(spec, ["a b"], [ref]))) == TASKS[task].metrics


def test_best_metric_errors(tiny_phi3, chat_files, tmp_path, capsys):
    train, val = chat_files
    cfg = write_config(
        tmp_path / "c.json", tiny_phi3, train, tmp_path / "out", validation=val, max_steps=2, eval_every=1
    )
    assert run_cli("train", cfg, "--set", "training.best_metric=acuracy") == 2
    assert "did you mean 'accuracy'?" in capsys.readouterr().err
    # A chat run without a task scores no accuracy: refused before the first step.
    assert run_cli("train", cfg, "--set", "training.best_metric=chrf") == 2
    err = capsys.readouterr().err
    assert "chrf is not computed" in err and "perplexity" in err and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_preference_pairs_compare_without_a_reference_model(tiny_phi3, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run = tmp_path / "dpo"
    _train_example("dpo", tiny_phi3, run, "--max-steps", "20", "--set", "method.target_modules=[all-linear,lm_head]")
    assert run_cli("compare", tiny_phi3, run, "--names", "base,dpo", "--output", tmp_path / "r") == 0
    comparison = json.loads((tmp_path / "r" / "comparison.json").read_text())
    base, tuned = (m["metrics"] for m in comparison["models"])
    assert comparison["primary_metric"] == "preference_accuracy"
    # Raw log-probabilities, no reference: a long preferred reply can still be the less likely one.
    assert tuned["preference_accuracy"] > base["preference_accuracy"] + 0.25 and tuned["logp_margin"] > 10


def test_raw_text_template_runs_are_asked_their_raw_prompt(tiny_phi3, tmp_path, monkeypatch):
    """data.format template (no chat template): eval answers the raw "### Text: ...\\n### Tone:" prompt."""
    monkeypatch.chdir(REPO)
    run = tmp_path / "tpl"
    assert (
        run_cli(
            "train",
            REPO / "examples" / "classification" / "template.yaml",
            "--set",
            f"model.name_or_path={tiny_phi3}",
            "--set",
            f"output_dir={run}",
            "--max-steps",
            "5",
        )
        == 0
    )
    assert run_cli("eval", run, "--task", "none", "--limit", "4") == 0
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert predictions == []  # task none: loss-based metrics only
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["loss"] > 0 and "perplexity" in metrics
    assert run_cli("eval", run, "--task", "chat", "--limit", "4") == 0
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and predictions[0]["prompt"].startswith("### Text: ")
    assert predictions[0]["prompt"].endswith("### Tone: ") and predictions[0]["reference"] in (
        "negative",
        "neutral",
        "positive",
    )


def test_live_progress_shows_whatever_eval_metrics_a_run_has(monkeypatch):
    """On a terminal the bar printed eval_perplexity, which head runs do not have (KeyError)."""
    import io

    from rich.console import Console

    from phitune.training import progress

    out = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=out, force_terminal=True, width=200))
    bar = progress.Progress(total=2)
    bar.update(1, 0.5, 1e-3, 100.0, {"step": 1, "eval_loss": 0.25, "eval_accuracy": 0.75, "eval_macro_f1": 0.5})
    bar.close()
    assert "eval_accuracy 0.7500" in out.getvalue() and "eval_macro_f1 0.5000" in out.getvalue()
