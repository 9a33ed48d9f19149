"""Golden values, computed by hand, for every task metric (edge cases included)."""

import pytest

import phitune.tasks.metrics as metrics


def test_classification_counts_by_hand():
    got = metrics.classification(["pos", "neg", "pos", "maybe"], ["pos", "pos", "neg", "neg"], labels=["neg", "pos"])
    assert got["accuracy"] == 0.25
    assert got["per_class"]["pos"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert got["per_class"]["neg"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert got["macro_f1"] == 0.25
    # Rows are references, columns predictions; an answer outside the label set keeps its own column.
    assert got["confusion"] == {"neg": {"neg": 0, "pos": 1, "maybe": 1}, "pos": {"neg": 1, "pos": 1, "maybe": 0}}


def test_classification_edge_cases():
    got = metrics.classification(["", " très bien "], ["très bien", "très bien"])
    assert got["accuracy"] == 0.5  # surrounding spaces are ignored, an empty answer is wrong
    assert got["per_class"]["très bien"]["precision"] == 1.0 and got["per_class"]["très bien"]["recall"] == 0.5
    assert got["confusion"]["très bien"][""] == 1
    with pytest.raises(ValueError):
        metrics.classification(["a"], ["a", "b"])


def test_entities_by_hand():
    got = metrics.entities([[("Alice", "PER"), ("Paris", "LOC")], []], [[("Alice", "PER")], [("Bob", "PER")]])
    assert (got["precision"], got["recall"], got["f1"]) == (0.5, 0.5, 0.5)
    # Type must match too; a duplicate prediction counts once.
    got = metrics.entities([[("A", "PER"), ("A", "PER"), ("B", "ORG")]], [[("A", "PER"), ("B", "LOC")]])
    assert got["correct"] == 1 and got["precision"] == pytest.approx(1 / 3) and got["recall"] == 0.5
    assert got["f1"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))


def test_entities_edge_cases():
    assert metrics.entities([[]], [[]])["f1"] == 1.0  # nothing to find, nothing found
    assert metrics.entities([[("x", "T")]], [[]])["f1"] == 0.0  # found something that is not there
    assert metrics.entities([[]], [[("x", "T")]])["f1"] == 0.0
    assert metrics.entities([[(0, 2, "PER")]], [[(0, 2, "PER")]])["f1"] == 1.0  # spans from a head work alike
    assert metrics.parse_entities('[{"text": "Zoë", "type": "PER"}]') == [("Zoë", "PER")]
    assert metrics.parse_entities("[]") == []
    assert metrics.parse_entities("Alice is a person") is None
    assert metrics.parse_entities('{"text": "x", "type": "T"}') is None


def test_qa_squad_normalisation_by_hand():
    assert metrics.normalize_answer("The  Cat!") == "cat"
    got = metrics.qa(["the cat sat", "Paris.", ""], ["A cat sat down", ["Paris", "paris france"], "x"])
    # 1: tokens [cat, sat] vs [cat, sat, down]: P 1, R 2/3, F1 0.8, no exact match. 2: exact. 3: empty answer.
    assert got["exact_match"] == pytest.approx(1 / 3)
    assert got["token_f1"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert metrics.qa(["the"], ["a"]) == {"exact_match": 1.0, "token_f1": 1.0}  # both normalise to nothing


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat is on the mat": the cat on the mat (5 of 6 each way).
    assert metrics.rouge_l(["the cat sat on the mat"], ["The cat is on the mat"])["rouge_l"] == pytest.approx(5 / 6)
    assert metrics.rouge_l([""], ["anything"])["rouge_l"] == 0.0
    assert metrics.rouge_l(["a b", "x"], ["a b", "y"])["rouge_l"] == 0.5


def test_translation_bleu_and_chrf_bounds():
    pytest.importorskip("sacrebleu")
    same = metrics.translation(["le chat est noir ."], ["le chat est noir ."])
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    disjoint = metrics.translation(["xyz"], ["le chat est noir ."])
    assert disjoint["bleu"] == 0.0 and disjoint["chrf"] < 5


def test_distinct_2_golden():
    # bigrams: (a b) (b a) (a b) | (a b) ; unique 2 of 4. Unicode words count like any other.
    assert metrics.distinct_n(["a b a b", "A B"], 2) == {"distinct_2": 0.5}
    assert metrics.distinct_n(["café au lait", "thé"], 2) == {"distinct_2": 1.0}
    assert metrics.distinct_n(["one", ""], 2) == {"distinct_2": 0.0}  # no bigram at all


def test_multiple_choice_golden():
    import math

    logliks = [[-1.0, -2.0, -3.0], [-4.0, -1.0]]
    correct = [{0}, {0}]
    lengths = [[1, 1, 1], [1, 10]]  # per character: -4 vs -0.1 -> still choice 1
    out = metrics.multiple_choice(logliks, correct, lengths)
    assert out["accuracy"] == 0.5 and out["accuracy_norm"] == 0.5
    p1 = math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3))
    p2 = math.exp(-4) / (math.exp(-4) + math.exp(-1))
    assert out["mc2"] == pytest.approx((p1 + p2) / 2)
    # Length normalisation flips a choice: -6 over 6 characters beats -2 over 1.
    assert metrics.multiple_choice([[-2.0, -6.0]], [{1}], [[1, 6]])["accuracy_norm"] == 1.0
    # Several correct choices (MC2): the mass on all of them.
    assert metrics.multiple_choice([[0.0, 0.0, 0.0, 0.0]], [{0, 1, 2}])["mc2"] == pytest.approx(0.75)
