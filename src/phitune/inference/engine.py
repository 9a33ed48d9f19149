"""The engine: one base model, many requests, one running batch.

A thread of its own runs steps. Each step admits waiting requests (when a batch slot, the KV blocks
for prompt + reply, and their adapter are all available), then runs one forward over every running
sequence: one token for each decoding sequence, and a chunk of prompt for those still prefilling,
so a long new prompt never stalls the replies under way (`max_step_tokens` bounds a step). Rows
are grouped by adapter: the base weights run once over all of them, each adapter's LoRA update on
its own rows. A sequence leaves the batch the step it ends (end of turn, stop string, max_tokens,
cancelled) and its blocks go to the next request.

Callers hand in a `sink` that receives `Event`s from the engine's thread; it must not block.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from phitune.errors import PhituneError
from phitune.inference.adapters import AdapterCache, Full
from phitune.inference.kv import KVPool, slots
from phitune.inference.limits import Limits
from phitune.inference.lora import LoraSet, read_adapter
from phitune.inference.metrics import Metrics
from phitune.inference.runner import Prefill, Runner, Step
from phitune.inference.sampling import Sampling, next_tokens
from phitune.inference.text import Detokenizer, StopStrings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Event:
    """What a request's sink receives: text pieces, then one `done` (or one `error`)."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish: str | None = None  # done: "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 500  # error: the HTTP status it maps to


@dataclass
class _Sequence:
    prompt: list[int]
    sampling: Sampling
    adapter: str | LoraSet | None  # a directory (cached by the engine), a LoraSet, or the base
    sink: Callable[[Event], None]
    arrived: float = field(default_factory=time.perf_counter)
    lora: LoraSet | None = None
    table: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the pool
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    stops: StopStrings | None = None
    last_token_at: float = 0.0

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


class Handle:
    """A submitted request: `cancel()` from any thread ends it at the next step."""

    def __init__(self, engine: Engine, seq: _Sequence) -> None:
        self._engine, self._seq = engine, seq

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine._wake()


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        limits: Limits | None = None,
        stop_ids: list[int] | None = None,
        metrics: Metrics | None = None,
        name: str = "engine",
        pack: bool = True,
    ) -> None:
        from phitune.inference.prompts import end_of_turn_ids

        self.limits = limits = limits or Limits()
        self.runner = Runner(model, pack=pack)
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids if stop_ids is not None else end_of_turn_ids(model, tokenizer))
        self.metrics = metrics or Metrics()
        r = self.runner
        self.pool = KVPool(
            layers=len(r.layers),
            kv_heads=r.kv_heads,
            head_dim=r.head_dim,
            dtype=r.dtype,
            budget_bytes=limits.kv_cache_mb * 2**20,
        )
        targets = r.linear_names()
        self.adapters = AdapterCache(
            lambda path: read_adapter(path, targets),
            max_count=limits.max_adapters,
            max_bytes=limits.max_adapter_mb * 2**20,
            metrics=self.metrics,
        )
        self._inbox: deque[_Sequence] = deque()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._forget: deque[str] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"phitune-{name}")
        self._thread.start()

    # ---- the caller's side (any thread) ----

    @property
    def positions(self) -> int:
        return self.runner.positions

    def submit(
        self,
        prompt: list[int],
        sampling: Sampling,
        sink: Callable[[Event], None],
        adapter: str | LoraSet | None = None,
    ) -> Handle:
        """Queue a request. Its sink gets text events and one done or error event."""
        seq = _Sequence(list(prompt), sampling, adapter, sink)
        need = len(seq.prompt) + sampling.max_tokens
        if not seq.prompt:
            raise PhituneError("the prompt is empty")
        if sampling.max_tokens < 1:
            raise PhituneError(f"max_tokens {sampling.max_tokens}: at least 1")
        vocab = int(self.runner.config.vocab_size)
        if min(seq.prompt) < 0 or max(seq.prompt) >= vocab:  # a bad id would fail the whole step's batch
            raise PhituneError(f"the prompt has a token id outside the vocabulary (0..{vocab - 1})")
        if need > self.pool.capacity_tokens:
            raise PhituneError(
                f"the prompt and max_tokens need {need} tokens of KV cache; this engine holds "
                f"{self.pool.capacity_tokens} (--kv-cache-mb {self.limits.kv_cache_mb}): ask for fewer tokens"
            )
        with self._cv:
            if self._closed:
                raise PhituneError("the inference engine is shut down")
            self._inbox.append(seq)
            self._cv.notify()
        return Handle(self, seq)

    def forget(self, directory: str) -> None:
        """A deleted model's adapters leave the cache (at once, or when their last request ends)."""
        with self._cv:
            self._forget.append(directory)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- the engine's thread ----

    def _loop(self) -> None:
        self.runner.prepare()
        self.pool.allocate()
        while True:
            with self._cv:
                while not (self._closed or self._inbox or self._running or self._forget or self._admissible()):
                    self._cv.wait()
                if self._closed:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                while self._forget:
                    self.adapters.forget(self._forget.popleft())
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its batch, never the engine
                for seq in self._running:
                    self._fail(seq, PhituneError(f"generation failed: {type(exc).__name__}: {exc}"))
                self._running = []
        for seq in [*self._running, *self._waiting, *self._inbox]:
            self._fail(seq, PhituneError("the inference engine shut down"), status=503)

    def _admissible(self) -> bool:
        """Work for the loop that is not blocked (waiting requests a step could admit)."""
        return bool(self._waiting) and len(self._running) < self.limits.max_batch and self.pool.can_hold(1)

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        m = self.metrics
        m.gauge("waiting_requests", len(self._waiting))
        m.gauge("running_sequences", len(self._running))
        m.gauge("kv_cache_usage", round(self.pool.used_fraction, 4))
        m.gauge("adapters_loaded", len(self.adapters.entries))
        if not self._running:
            if self._waiting:  # blocked on memory or adapters held by nobody: cannot happen, but never spin
                time.sleep(0.01)
            return
        started = time.perf_counter()
        step, chunks, sampled = self._plan()
        logits = self.runner.forward(step, self.pool)
        for seq, n in chunks:
            seq.computed += n
        tokens = next_tokens(logits, [s.sampling for s in sampled], [s.generator for s in sampled])
        m.observe("step_seconds", time.perf_counter() - started)
        for seq, token in zip(sampled, tokens):
            self._advance(seq, token)
        self._running = [s for s in self._running if s.table]

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        for seq in [s for s in self._running if s.cancelled]:
            self._finish(seq, "cancelled")
        self._running = [s for s in self._running if s.table]

    def _admit(self) -> None:
        held: list[_Sequence] = []
        while self._waiting and len(self._running) < self.limits.max_batch:
            seq = self._waiting[0]
            if not self.pool.can_hold(seq.tokens + seq.sampling.max_tokens):
                break  # first come, first served: later requests do not overtake for memory
            self._waiting.popleft()
            try:
                seq.lora = self._pin(seq)
            except Full:
                held.append(seq)  # its adapter needs a cache slot that running sequences hold
                continue
            except Exception as exc:  # noqa: BLE001 - a bad adapter fails its own request only
                self._fail(seq, exc if isinstance(exc, PhituneError) else PhituneError(str(exc)), status=400)
                continue
            seq.table = self.pool.take(len(seq.prompt) + seq.sampling.max_tokens)
            seq.generator = seq.sampling.generator()
            seq.detok = Detokenizer(self.tokenizer, seq.prompt)
            seq.stops = StopStrings(list(seq.sampling.stop))
            self._running.append(seq)
        self._waiting.extendleft(reversed(held))

    def _pin(self, seq: _Sequence) -> LoraSet | None:
        if seq.adapter is None or isinstance(seq.adapter, LoraSet):
            return seq.adapter
        return self.adapters.pin(seq.adapter)

    def _plan(self) -> tuple[Step, list[tuple[_Sequence, int]], list[_Sequence]]:
        """This step's rows: every decoding sequence's last token, then prompt chunks up to the
        step's token budget, oldest request first; rows ordered by adapter."""
        decoding = [s for s in self._running if not s.prefilling]
        budget = max(self.limits.max_step_tokens - len(decoding), 0)
        chunks: list[tuple[_Sequence, int]] = []
        for seq in self._running:
            if seq.prefilling and budget > 0:
                n = min(len(seq.prompt) - seq.computed, budget)
                chunks.append((seq, n))
                budget -= n
        work = [(s, 1) for s in decoding] + chunks
        work.sort(key=lambda item: id(item[0].lora) if item[0].lora is not None else 0)
        ids = {id(s) for s in decoding}
        sampled = [s for s, n in work if id(s) in ids or s.computed + n == len(s.prompt)]
        return self._build(work, ids), chunks, sampled

    def _build(self, work: list[tuple[_Sequence, int]], decoding: set[int]) -> Step:
        tokens: list[int] = []
        positions: list[int] = []
        writes: list[torch.Tensor] = []
        groups: list[tuple[LoraSet | None, int, int]] = []
        decode_rows, decode_tables, decode_lengths, prefills, sample_rows = [], [], [], [], []
        row = 0
        for seq, n in work:
            if id(seq) in decoding:
                start = seq.tokens - 1
                ids = [seq.generated[-1]]
            else:
                start = seq.computed
                ids = seq.prompt[start : start + n]
            tokens += ids
            positions += range(start, start + n)
            writes.append(slots(seq.table, start, start + n))
            if groups and groups[-1][0] is seq.lora:
                groups[-1] = (seq.lora, groups[-1][1], row + n)
            else:
                groups.append((seq.lora, row, row + n))
            if id(seq) in decoding:
                decode_rows.append(row)
                decode_tables.append(seq.table)
                decode_lengths.append(start + 1)
                sample_rows.append(row)
            else:
                prefills.append(Prefill(row, row + n, slots(seq.table, 0, start + n), start))
                if start + n == len(seq.prompt):
                    sample_rows.append(row + n - 1)
            row += n
        step = Step(
            tokens=torch.tensor(tokens),
            positions=torch.tensor(positions),
            write_slots=torch.cat(writes),
            groups=groups,
            prefills=prefills,
            sample_rows=torch.tensor(sample_rows),
        )
        if decode_rows:
            longest = max(decode_lengths)
            step.decode_rows = torch.tensor(decode_rows)
            step.decode_slots = torch.stack(
                [_padded(slots(t, 0, n), longest) for t, n in zip(decode_tables, decode_lengths)]
            )
            keys = torch.arange(longest)[None].expand(len(decode_rows), -1)
            step.decode_key_positions = torch.where(keys < torch.tensor(decode_lengths)[:, None], keys, -1)
        return step

    def _advance(self, seq: _Sequence, token: int) -> None:
        now = time.perf_counter()
        m = self.metrics
        if not seq.generated:
            m.observe("time_to_first_token_seconds", now - seq.arrived)
            m.count("prompt_tokens", len(seq.prompt))
        else:
            m.observe("inter_token_latency_seconds", now - seq.last_token_at)
        seq.last_token_at = now
        if seq.cancelled:
            self._finish(seq, "cancelled")
            return
        if token in self.stop_ids:
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        m.count("generated_tokens")
        assert seq.stops is not None and seq.detok is not None  # set when it was admitted
        text = seq.stops.feed(seq.detok.add(token))
        if text:
            seq.sink(Event("text", text))
        if seq.stops.hit:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.sampling.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, finish: str) -> None:
        if seq.stops is not None and seq.detok is not None and not seq.stops.hit and finish != "cancelled":
            tail = seq.stops.feed(seq.detok.flush())
            tail += "" if seq.stops.hit else seq.stops.flush()
            if tail:
                seq.sink(Event("text", tail))
        self._release(seq)
        self.metrics.count("requests", finish=finish)
        seq.sink(Event("done", finish=finish, prompt_tokens=len(seq.prompt), completion_tokens=len(seq.generated)))

    def _fail(self, seq: _Sequence, exc: BaseException, status: int = 500) -> None:
        self._release(seq)
        self.metrics.count("requests", finish="error")
        seq.sink(Event("error", text=str(exc), status=status))

    def _release(self, seq: _Sequence) -> None:
        if seq.table:
            self.pool.give_back(seq.table)
        if isinstance(seq.adapter, str) and seq.lora is not None:
            self.adapters.unpin(seq.adapter)
            seq.lora = None


def _padded(row: torch.Tensor, width: int) -> torch.Tensor:
    """A sequence's context slots padded to the step's longest with its own first slot: a real,
    finite entry, masked out (its block table may not reach `width`)."""
    return torch.cat([row, row[:1].expand(width - len(row))])
