"""Task metrics on predictions and references (strings), each a pure function with golden tests.

Classification and NER are computed here (they are counts); QA follows the SQuAD v1.1 script's
normalisation; ROUGE-L is the LCS F-measure over whitespace tokens; BLEU and chrF come from
sacrebleu (the reference implementation: our numbers are comparable with published ones).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Sequence

from phitune.errors import PhituneError


def classification(predictions: list[str], references: list[str], labels: list[str] | None = None) -> dict:
    """Accuracy, macro-F1 over the labels, per-class precision/recall/F1 and the confusion matrix
    (rows: reference, columns: prediction; an answer outside the label set counts as wrong and
    appears in the matrix under its own text)."""
    _same_length(predictions, references)
    labels = list(labels) if labels else sorted(set(references))
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    per_class = {}
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(preds, refs))
        predicted, actual = preds.count(label), refs.count(label)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    columns = labels + sorted({p for p in preds if p not in labels})
    confusion = {r: {c: sum(p == c and x == r for p, x in zip(preds, refs)) for c in columns} for r in labels}
    return {
        "accuracy": sum(p == r for p, r in zip(preds, refs)) / len(refs) if refs else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(per_class) if per_class else 0.0,
        "per_class": per_class,
        "confusion": confusion,
    }


def parse_entities(text: str) -> list[tuple[str, str]] | None:
    """A generated entity list (`[{"text": ..., "type": ...}]`) as (text, type) pairs; None when
    the output is not such a list (it then scores as no entities)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(value, list) or not all(
        isinstance(e, dict) and isinstance(e.get("text"), str) and isinstance(e.get("type"), str) for e in value
    ):
        return None
    return [(e["text"], e["type"]) for e in value]


def entities(predicted: list[list[tuple]], reference: list[list[tuple]]) -> dict:
    """Entity-level precision / recall / F1: an entity counts when it matches exactly (span and
    type), each reference entity at most once. Entities are any hashable tuples: (start, end,
    type) spans from a head, or (text, type) pairs from generation."""
    _same_length(predicted, reference)
    tp = n_pred = n_ref = 0
    for pred, ref in zip(predicted, reference):
        left = Counter(ref)
        for e in pred:
            if left[e] > 0:
                tp += 1
                left[e] -= 1
        n_pred, n_ref = n_pred + len(pred), n_ref + len(ref)
    precision = tp / n_pred if n_pred else (1.0 if n_ref == 0 else 0.0)
    recall = tp / n_ref if n_ref else (1.0 if n_pred == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "predicted": n_pred, "reference": n_ref, "correct": tp}


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation and the articles a/an/the, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa(predictions: list[str], references: Sequence[str | list[str]]) -> dict:
    """Exact match and token F1, each the best over a question's reference answers."""
    _same_length(predictions, references)
    em = f1 = 0.0
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else refs
        em += max(float(normalize_answer(pred) == normalize_answer(r)) for r in refs)
        f1 += max(_token_f1(pred, r) for r in refs)
    n = len(predictions) or 1
    return {"exact_match": em / n, "token_f1": f1 / n}


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-L F-measure (beta 1) over lower-cased whitespace tokens, averaged over examples."""
    _same_length(predictions, references)
    total = 0.0
    for pred, ref in zip(predictions, references):
        p, r = pred.lower().split(), ref.lower().split()
        lcs = _lcs(p, r)
        if lcs:
            precision, recall = lcs / len(p), lcs / len(r)
            total += 2 * precision * recall / (precision + recall)
    return {"rouge_l": total / len(predictions) if predictions else 0.0}


def distinct_n(predictions: list[str], n: int = 2) -> dict:
    """Distinct-n (Li et al. 2016): unique word n-grams over all n-grams of all outputs; 0 when
    there are none. Repetitive or copied generations score low."""
    grams = [
        tuple(words[i : i + n]) for p in predictions for words in [p.lower().split()] for i in range(len(words) - n + 1)
    ]
    return {f"distinct_{n}": len(set(grams)) / len(grams) if grams else 0.0}


def multiple_choice(
    logliks: list[list[float]], correct: list[set[int]], lengths: list[list[int]] | None = None
) -> dict:
    """Log-likelihood scoring of choices, as lm-evaluation-harness does it.

    accuracy: the most likely choice is a correct one (TruthfulQA's MC1 when one is correct);
    accuracy_norm: the same with log-likelihood per character of the choice (`lengths`);
    mc2: the probability mass on correct choices, normalised over the choices (TruthfulQA MC2)."""
    _same_length(logliks, correct)
    acc = acc_norm = mc2 = 0.0
    for i, (ll, good) in enumerate(zip(logliks, correct)):
        acc += float(max(range(len(ll)), key=lambda k: ll[k]) in good)
        if lengths is not None:
            acc_norm += float(max(range(len(ll)), key=lambda k: ll[k] / max(lengths[i][k], 1)) in good)
        top = max(ll)
        probs = [math.exp(x - top) for x in ll]
        mc2 += sum(probs[k] for k in good) / sum(probs)
    n = len(logliks) or 1
    out = {"accuracy": acc / n, "mc2": mc2 / n}
    if lengths is not None:
        out["accuracy_norm"] = acc_norm / n
    return out


def translation(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF from sacrebleu (default settings, one reference per sentence)."""
    _same_length(predictions, references)
    try:
        import sacrebleu
    except ImportError as exc:
        raise PhituneError("translation metrics need sacrebleu: pip install 'phitune[eval]'") from exc
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
