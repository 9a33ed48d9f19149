"""The engine's counters, gauges and histograms, written in Prometheus' text format (the
convention of vLLM and TGI: `phitune_` names, `_total` counters, cumulative `le` buckets)."""

from __future__ import annotations

import bisect
import threading

BUCKETS = {
    "time_to_first_token_seconds": (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
    "inter_token_latency_seconds": (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0),
    "adapter_load_seconds": (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    "step_seconds": (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2),
}
HELP = {
    "requests": "requests finished, by how they ended",
    "generated_tokens": "tokens generated",
    "prompt_tokens": "prompt tokens computed",
    "adapter_cache_hits": "requests whose adapter was in memory",
    "adapter_cache_misses": "requests whose adapter was loaded for them",
    "adapter_cache_evictions": "adapters dropped from memory to make room",
    "waiting_requests": "requests queued for a batch slot, KV blocks or an adapter",
    "running_sequences": "sequences in the running batch",
    "kv_cache_usage": "fraction of the KV cache's blocks in use",
    "adapters_loaded": "adapters in memory",
    "time_to_first_token_seconds": "from a request's arrival to its first token",
    "inter_token_latency_seconds": "between two tokens of one sequence",
    "adapter_load_seconds": "time to read an adapter not in memory",
    "step_seconds": "one engine step (a forward over the running batch)",
}


class Metrics:
    """One per process, shared by its engines; every sample carries its labels (the model)."""

    def __init__(self, **labels: str) -> None:
        self.lock = threading.Lock()
        self.labels = labels
        self.counters: dict[tuple[str, str], float] = {}
        self.gauges: dict[tuple[str, str], float] = {}
        self.histograms: dict[tuple[str, str], list] = {}  # -> [bucket counts, sum, count]

    def view(self, **labels: str) -> "Metrics":
        """The same store, with `labels` added to what this view records."""
        child = Metrics(**self.labels, **labels)
        child.lock, child.counters, child.gauges, child.histograms = (
            self.lock,
            self.counters,
            self.gauges,
            self.histograms,
        )
        return child

    def _key(self, name: str, extra: dict) -> tuple[str, str]:
        labels = {**self.labels, **extra}
        return name, ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))

    def count(self, name: str, n: float = 1, **labels: str) -> None:
        key = self._key(name, labels)
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def gauge(self, name: str, value: float) -> None:
        self.gauges[self._key(name, {})] = value

    def observe(self, name: str, seconds: float) -> None:
        bounds, key = BUCKETS[name], self._key(name, {})
        with self.lock:
            h = self.histograms.setdefault(key, [[0] * (len(bounds) + 1), 0.0, 0])
            h[0][bisect.bisect_left(bounds, seconds)] += 1
            h[1] += seconds
            h[2] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (tests, benchmarks)."""
        return self.counters.get(self._key(name, labels), 0)

    def render(self) -> str:
        """Prometheus text exposition, one HELP and TYPE per family."""
        out: list[str] = []
        with self.lock:
            counters = sorted(self.counters.items())
            gauges = sorted(self.gauges.items())
            histograms = sorted(self.histograms.items())
        for family, kind, rows in (
            ("_total", "counter", counters),
            ("", "gauge", gauges),
        ):
            for (name, labels), value in rows:
                full = f"phitune_{name}{family}"
                _head(out, full, name, kind)
                out.append(f"{full}{_braces(labels)} {value:g}")
        for (name, labels), (counts, total, n) in histograms:
            full = f"phitune_{name}"
            _head(out, full, name, "histogram")
            running = 0
            for bound, c in zip((*BUCKETS[name], "+Inf"), counts):
                running += c
                le = 'le="' + str(bound) + '"'
                out.append(f"{full}_bucket{_braces(labels, le)} {running}")
            out.append(f"{full}_sum{_braces(labels)} {total:g}")
            out.append(f"{full}_count{_braces(labels)} {n}")
        return "\n".join(out) + "\n"


def _braces(*parts: str) -> str:
    inner = ",".join(p for p in parts if p)
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _head(out: list[str], full: str, name: str, kind: str) -> None:
    marker = f"# TYPE {full} {kind}"
    if marker not in out:
        out += [f"# HELP {full} {HELP.get(name, name)}", marker]
