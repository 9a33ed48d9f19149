"""Held-out examples that are not held out: eval rows that also occur in the training data.

Two counts: the same example (input and answer), and the same input with another answer (the
model saw the question, with a different reply). Both make a score look better than it is."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from phitune.samples import Chat, Labelled, Plain, Preference, Tagged


def input_key(sample: object) -> str:
    """What the model is given: the conversation before the last reply, the raw prompt, the text."""
    value: object
    if isinstance(sample, Chat):
        last = max((i for i, m in enumerate(sample.messages) if m["role"] == "assistant"), default=len(sample.messages))
        value = [(m["role"], m["content"].strip()) for m in sample.messages[:last]]
    elif isinstance(sample, Plain):
        value = (sample.prompt or sample.completion).strip()
    elif isinstance(sample, Labelled):
        value = sample.text.strip()
    elif isinstance(sample, Tagged):
        value = sample.tokens
    elif isinstance(sample, Preference):
        value = [(m["role"], m["content"].strip()) for m in sample.prompt]
    else:
        value = repr(sample)
    return json.dumps(value, ensure_ascii=False)


def whole_key(sample: object) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(sample), sort_keys=True, ensure_ascii=False)  # type: ignore[call-overload]


@dataclass
class Leakage:
    checked: int
    exact: list[tuple[str, str]] = field(default_factory=list)  # (eval where, train where)
    same_input: list[tuple[str, str]] = field(default_factory=list)  # the input seen, another answer

    def as_dict(self) -> dict:
        return {
            "checked": self.checked,
            "exact": len(self.exact),
            "same_input": len(self.same_input),
            "first": (self.exact + self.same_input)[:5],
        }

    def warning(self, train_path: str) -> str | None:
        if not (self.exact or self.same_input):
            return None
        first_eval, first_train = (self.exact + self.same_input)[0]
        return (
            f"leakage: {len(self.exact)} of {self.checked} eval examples also occur in the training data {train_path}"
            f" and {len(self.same_input)} more share their input with a training example (first: {first_eval} = "
            f"{first_train}); their scores are not held-out, remove them from one of the files"
        )


def find_leakage(eval_samples: list[tuple[str, object]], train_samples: list[tuple[str, object]]) -> Leakage:
    whole: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for where, sample in train_samples:
        whole.setdefault(whole_key(sample), where)
        inputs.setdefault(input_key(sample), where)
    out = Leakage(len(eval_samples))
    for where, sample in eval_samples:
        if (hit := whole.get(whole_key(sample))) is not None:
            out.exact.append((where, hit))
        elif (hit := inputs.get(input_key(sample))) is not None:
            out.same_input.append((where, hit))
    return out
