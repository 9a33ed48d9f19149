"""The inference engine against transformers and PEFT: the same greedy tokens for a base and for
LoRA adapters of different ranks, alone or batched with other adapters' requests that join at
any step; long prompts in chunks; seeded sampling that ignores batch mates; the adapter cache's
bounds; bad adapters failing only their own request; admission that waits for KV memory."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from phitune.generate import end_of_turn_ids, greedy_ids, prompt_ids
from phitune.hardware import cpu_has_native_bf16
from phitune.inference.adapters import AdapterCache, Full
from phitune.inference.engine import Engine
from phitune.inference.limits import Limits
from phitune.inference.metrics import Metrics
from phitune.inference.sampling import Sampling
from phitune.models import load_for_inference

QUESTIONS = [
    "What is the capital of France?",
    "Write one line about the sea.",
    "List three prime numbers, please, and say why each one is prime.",
    "hi",
    "Translate good morning into Spanish and into German.",
]


class Collect:
    """A request's sink: its text, its end, and when each came."""

    def __init__(self) -> None:
        self.text, self.done, self.ended = "", None, threading.Event()

    def __call__(self, event) -> None:
        if event.kind == "text":
            self.text += event.text
        else:
            self.done = event
            self.ended.set()


def run(engine: Engine, requests: list[tuple[list[int], Sampling, object]], gap: float = 0.0) -> list:
    """Submit (prompt, sampling, adapter) requests, `gap` seconds apart; the handles' token ids."""
    sinks, handles = [], []
    for ids, sampling, adapter in requests:
        sinks.append(Collect())
        handles.append(engine.submit(ids, sampling, sinks[-1], adapter=adapter))
        time.sleep(gap)
    for s in sinks:
        assert s.ended.wait(120)
        assert s.done.kind == "done", s.done.text
    return [h._seq.generated for h in handles]


def _prompts(tok) -> list[list[int]]:
    return [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]


def make_adapter(base, path, *, r: int, targets, seed: int, rslora: bool = False, dora: bool = False):
    """A LoRA (or DoRA) adapter with random (non-zero) B and magnitudes, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, use_rslora=rslora, use_dora=dora
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tiny_phi3, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [
        str(make_adapter(tiny_phi3, root / "a", r=4, targets="all-linear", seed=1)),
        str(make_adapter(tiny_phi3, root / "b", r=2, targets=["qkv_proj", "o_proj"], seed=2, rslora=True)),
        str(make_adapter(tiny_phi3, root / "c", r=8, targets=["gate_up_proj", "down_proj"], seed=3)),
        str(make_adapter(tiny_phi3, root / "d", r=4, targets="all-linear", seed=7, dora=True)),
    ]


@pytest.mark.parametrize("arch", ["phi3", "llama", "qwen2", "mistral"])
def test_the_engine_gives_transformers_greedy_tokens(arch, model_cache):
    model, tok = load_for_inference(str(model_cache(arch)))
    engine = Engine(model, tok, limits=Limits(max_batch=8, kv_cache_mb=64))
    try:
        prompts = _prompts(tok)
        got = run(engine, [(p, Sampling(max_tokens=20), None) for p in prompts])
        want = [greedy_ids(model, tok, p, max_new_tokens=20) for p in prompts]
        assert got == want
        assert sum(map(len, got)) > 40  # an untrained model: mostly long replies, the hard case
    finally:
        engine.close()


def test_adapters_batched_together_give_the_tokens_of_each_alone_and_of_peft(tiny_phi3, adapters):
    """LoRA of three ranks (one rsLoRA) and DoRA, with the base, in one batch."""
    from peft import PeftModel

    model, tok = load_for_inference(str(tiny_phi3))
    engine = Engine(model, tok, limits=Limits(max_batch=16, kv_cache_mb=64, max_step_tokens=48))
    prompts = _prompts(tok)
    choices = [None, *adapters]
    mixed = [(p, Sampling(max_tokens=16), choices[i % 5]) for i, p in enumerate(prompts * 3)]
    try:
        alone = [run(engine, [r])[0] for r in mixed[:10]]
        together = run(engine, mixed, gap=0.01)  # later requests join a batch already decoding
    finally:
        engine.close()
    assert together[:10] == alone
    for (ids, _, adapter), tokens in zip(mixed[:5], alone[:5]):
        reference = model if adapter is None else PeftModel.from_pretrained(model, adapter).eval()
        assert greedy_ids(reference, tok, ids, max_new_tokens=16) == tokens, adapter
        if adapter is not None:
            model = reference.unload()
    assert len({tuple(t) for t in alone[:5]}) == 5  # each adapter changes the reply


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 weights are packed on CPUs with AVX-512 BF16 or AMX")
def test_bf16_packed_and_joined_layers_give_the_plain_layers_results(model_cache, tmp_path):
    """On a bf16 CPU the engine packs the weights for oneDNN and joins q/k/v and gate/up into one
    matmul each, with one LoRA A matmul per input: the same greedy tokens as every layer through
    its own module, for the base and two adapters batched together."""
    base = model_cache("llama")
    adapters = [
        str(make_adapter(base, tmp_path / "a", r=4, targets="all-linear", seed=5)),
        str(make_adapter(base, tmp_path / "b", r=2, targets=["q_proj", "v_proj", "up_proj"], seed=6)),
    ]
    model, tok = load_for_inference(str(base), dtype=torch.bfloat16)
    requests = [(p, Sampling(max_tokens=12), [None, *adapters][i % 3]) for i, p in enumerate(_prompts(tok) * 2)]
    answers = []
    for pack in (True, False):
        engine = Engine(model, tok, limits=Limits(kv_cache_mb=16), pack=pack)
        try:
            answers.append(run(engine, requests))
            if pack:
                assert engine.runner.joined and engine.runner.packed
        finally:
            engine.close()
    assert answers[0] == answers[1]


def test_a_long_prompt_is_computed_in_chunks_with_the_same_result(tiny_phi3):
    model, tok = load_for_inference(str(tiny_phi3))
    long_prompt = prompt_ids(tok, [{"role": "user", "content": " ".join(QUESTIONS * 4)}])
    assert len(long_prompt) > 100
    whole = Engine(model, tok, limits=Limits(max_step_tokens=512, kv_cache_mb=16))
    chunked = Engine(model, tok, limits=Limits(max_batch=4, max_step_tokens=12, kv_cache_mb=16))
    try:
        first = run(whole, [(long_prompt, Sampling(max_tokens=12), None)])
        # A short request decodes while the long one's prompt goes through 12 tokens a step.
        short = prompt_ids(tok, [{"role": "user", "content": "hi"}])
        second = run(chunked, [(short, Sampling(max_tokens=30), None), (long_prompt, Sampling(max_tokens=12), None)])
        assert second[1] == first[0]
        assert second[0] == greedy_ids(model, tok, short, max_new_tokens=30)
    finally:
        whole.close()
        chunked.close()


def test_seeded_sampling_gives_the_same_tokens_whatever_the_batch(tiny_phi3):
    model, tok = load_for_inference(str(tiny_phi3))
    engine = Engine(model, tok, limits=Limits(kv_cache_mb=16))
    prompts = _prompts(tok)
    sampled = Sampling(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16)
    try:
        alone = run(engine, [(prompts[0], sampled, None)])[0]
        crowd = [(p, Sampling(temperature=1.0, seed=i, max_tokens=16), None) for i, p in enumerate(prompts)]
        batched = run(engine, [*crowd[:2], (prompts[0], sampled, None), *crowd[2:]])[2]
        other_seed = run(engine, [(prompts[0], Sampling(temperature=0.9, top_p=0.95, seed=99, max_tokens=16), None)])
    finally:
        engine.close()
    assert batched == alone
    assert other_seed[0] != alone


def test_stop_strings_max_tokens_and_cancel_end_a_request(tiny_phi3):
    model, tok = load_for_inference(str(tiny_phi3))
    engine = Engine(model, tok, limits=Limits(kv_cache_mb=16))
    prompt = _prompts(tok)[0]
    try:
        full = Collect()
        engine.submit(prompt, Sampling(max_tokens=24), full)
        assert full.ended.wait(60) and full.done.finish == "length" and full.done.completion_tokens == 24
        word = full.text.split()[2]
        cut = Collect()
        engine.submit(prompt, Sampling(max_tokens=24, stop=(word,)), cut)
        assert cut.ended.wait(60) and cut.done.finish == "stop"
        assert cut.text == full.text[: full.text.index(word)]
        gone = Collect()
        handle = engine.submit(prompt, Sampling(max_tokens=10_000 // 8), gone)
        handle.cancel()
        assert gone.ended.wait(10) and gone.done.finish == "cancelled"
        assert engine.pool.used_fraction == 0  # its blocks are back
    finally:
        engine.close()


def test_streamed_text_equals_the_whole_decode_even_when_cut_mid_character(tiny_phi3):
    """A reply cut by max_tokens inside a multi-byte character ends as the whole decode does (with
    U+FFFD): evaluation scores the same answers whichever generator made them."""
    from transformers import AutoTokenizer

    from phitune.inference.text import Detokenizer

    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    ids = tok("Un café ☕ et 日本語, naïve.", add_special_tokens=False)["input_ids"]
    cut_mid_character = 0
    for n in range(1, len(ids) + 1):
        detok = Detokenizer(tok, [1])
        streamed = "".join(detok.add(i) for i in ids[:n])
        whole = tok.decode(ids[:n], skip_special_tokens=True)
        cut_mid_character += streamed != whole
        assert streamed + detok.flush() == whole
    assert cut_mid_character >= 3  # the tokenizer does split characters into bytes


def test_admission_waits_for_kv_memory_instead_of_failing(tiny_phi3):
    model, tok = load_for_inference(str(tiny_phi3))
    engine = Engine(model, tok, limits=Limits(kv_cache_mb=1))
    prompt = _prompts(tok)[0]
    n = int(engine.pool.capacity_tokens * 0.6) - len(prompt)  # room for one such request, not two
    try:
        alone = run(engine, [(prompt, Sampling(max_tokens=n), None)])
        both = run(engine, [(prompt, Sampling(max_tokens=n), None)] * 2)
        assert both == alone * 2
        with pytest.raises(Exception, match="KV cache"):
            engine.submit(prompt, Sampling(max_tokens=engine.pool.capacity_tokens), Collect())
    finally:
        engine.close()


def test_a_bad_adapter_fails_its_own_request_and_the_engine_serves_on(tiny_phi3, model_cache, adapters, tmp_path):
    model, tok = load_for_inference(str(tiny_phi3))
    other = make_adapter(model_cache("llama"), tmp_path / "llama-lora", r=2, targets="all-linear", seed=4)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((tmp_path / "llama-lora" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    engine = Engine(model, tok, limits=Limits(kv_cache_mb=16))
    prompt = _prompts(tok)[0]
    try:
        sinks = [Collect() for _ in range(4)]
        engine.submit(prompt, Sampling(max_tokens=8), sinks[0], adapter=adapters[0])
        engine.submit(prompt, Sampling(max_tokens=8), sinks[1], adapter=str(other))
        engine.submit(prompt, Sampling(max_tokens=8), sinks[2], adapter=str(corrupt))
        engine.submit(prompt, Sampling(max_tokens=8), sinks[3], adapter=None)
        for s in sinks:
            assert s.ended.wait(60)
        assert [s.done.kind for s in sinks] == ["done", "error", "error", "done"]
        assert "trained on another base model" in sinks[1].done.text and sinks[1].done.status == 400
        assert "not a readable safetensors file" in sinks[2].done.text
    finally:
        engine.close()


def test_the_adapter_cache_evicts_the_least_recently_used_never_one_in_use():
    loaded = []

    class Fake:
        nbytes = 10

    def load(key):
        loaded.append(key)
        return Fake()

    metrics = Metrics()
    cache = AdapterCache(load, max_count=2, max_bytes=100, metrics=metrics)
    cache.pin("a")
    cache.pin("b")
    with pytest.raises(Full):  # both in use: a third waits
        cache.pin("c")
    cache.unpin("a")
    cache.pin("c")  # a is evicted, b is kept (in use)
    assert set(cache.entries) == {"b", "c"}
    cache.unpin("b")
    cache.pin("b")  # a hit
    cache.unpin("b")
    cache.unpin("c")
    cache.pin("a")  # evicts c, the least recently used
    assert set(cache.entries) == {"a", "b"} and loaded == ["a", "b", "c", "a"]
    assert metrics.value("adapter_cache_hits") == 1 and metrics.value("adapter_cache_evictions") == 2
    cache.forget("a")  # in use: goes when its last request ends
    assert "a" in cache.entries
    cache.unpin("a")
    assert "a" not in cache.entries
    byte_bound = AdapterCache(load, max_count=10, max_bytes=25, metrics=metrics)
    for key in "xyz":
        byte_bound.pin(key)
        byte_bound.unpin(key)
    assert list(byte_bound.entries) == ["y", "z"]


def test_metrics_are_prometheus_text(tiny_phi3):
    model, tok = load_for_inference(str(tiny_phi3))
    metrics = Metrics()
    engine = Engine(model, tok, limits=Limits(kv_cache_mb=16), metrics=metrics.view(model="tiny"))
    try:
        run(engine, [(p, Sampling(max_tokens=4), None) for p in _prompts(tok)])
    finally:
        engine.close()
    text = metrics.render()
    assert 'phitune_requests_total{finish="length",model="tiny"} 5' in text
    assert 'phitune_time_to_first_token_seconds_count{model="tiny"} 5' in text
    assert 'phitune_inter_token_latency_seconds_bucket{model="tiny",le="+Inf"} 15' in text
    assert "# TYPE phitune_generated_tokens_total counter" in text
    assert end_of_turn_ids(model, tok)
