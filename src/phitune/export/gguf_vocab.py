"""A transformers tokenizer as GGUF metadata: llama.cpp's tokenizer model and pre-tokenizer, the
tokens with their types (and scores), merges, special ids, and the chat template.

llama.cpp re-implements each tokenizer by name (`tokenizer.ggml.pre`) rather than reading
tokenizer.json's regexes, so the pre-tokenizer is recognised here from tokenizer.json and a
tokenizer it cannot name is refused, not written as something that would split text otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from phitune.errors import PhituneError

if TYPE_CHECKING:
    import gguf

# tokenizer.json pre-tokenizer regexes -> llama.cpp's name for the same split.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEXES = {
    _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe",  # numbers in threes
    _WORDS + r"\p{N}" + _REST: "qwen2",  # digit by digit
}


def _byte_level(step: dict, regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex


def bpe_pre(pre: dict | None, where: str) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer's `pre_tokenizer`."""
    steps: list[dict] = (
        ((pre or {}).get("pretokenizers") or []) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    )
    if len(steps) == 1 and _byte_level(steps[0], regex=True):
        return "gpt-2"
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and _byte_level(steps[1], regex=True)
    ):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and _byte_level(steps[1], regex=False):
        name = SPLIT_REGEXES.get((steps[0].get("pattern") or {}).get("Regex", ""))
        if name:
            return name
    raise PhituneError(
        f"{where}: its tokenizer splits text with a pre-tokenizer llama.cpp has no name for here "
        f"({json.dumps(pre)[:160]}); GGUF export writes GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE and "
        "SentencePiece-style tokenizers"
    )


def add_vocab(writer, tokenizer, model_dir: Path, vocab_size: int) -> None:
    """Everything llama.cpp needs to tokenize, detokenize and apply the chat template."""
    import gguf

    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    where = str(model_dir / "tokenizer.json")
    if model.get("type") != "BPE":
        raise PhituneError(f"{where}: a {model.get('type')} tokenizer; GGUF export writes BPE tokenizers")
    spm = bool(model.get("byte_fallback"))
    tokens, types = _tokens(data, vocab_size)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre("default" if spm else bpe_pre(data.get("pre_tokenizer"), where))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:  # llama.cpp's SentencePiece tokenizer merges the highest-scoring pair first
        writer.add_token_scores(_merge_scores(model, tokens))
        writer.add_add_space_prefix(_prepends_space(data))
    special = gguf.SpecialVocab(model_dir, load_merges=not spm, n_vocab=len(tokens))
    special.chat_template = None  # these two are written below, from the tokenizer itself
    special.add_special_token = {}
    special.add_to_gguf(writer, quiet=True)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tokens(data: dict, vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Token texts by id and their llama.cpp types: special added tokens are CONTROL (parsed from
    text only when asked, never printed), other added ones USER_DEFINED, the embedding rows past
    the tokenizer UNUSED."""
    import gguf

    by_id = {i: text for text, i in data["model"]["vocab"].items()}
    kind = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kind[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        if i in kind:
            types.append(kind[i])
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) and data["model"].get("byte_fallback"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merge_scores(model: dict, tokens: list[str]) -> list[float]:
    """A merge of rank k makes a token of score -k: the SentencePiece tokenizer's highest score
    first is then the BPE tokenizer's earliest merge first."""
    rank: dict[str, int] = {}
    for k, merge in enumerate(model.get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, k)
    return [-float(rank.get(t, 0)) for t in tokens]


def _prepends_space(data: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text (Metaspace or a Prepend normalizer)."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text
