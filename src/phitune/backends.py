"""Where chat and generate run: PyTorch (a base, an adapter, a training output, a merged model)
or ONNX Runtime GenAI (a `phitune export onnx` output). Both stream a reply piece by piece,
render the conversation with the model's own chat template and stop at its end-of-turn token."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from types import ModuleType


def require_genai() -> ModuleType:
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise PhituneError(
            "ONNX export and the onnx backend need onnxruntime-genai: pip install 'phitune[onnx]'"
        ) from exc
    return og


def open_backend(model: str, *, backend: str | None = None, adapter: str | None = None) -> TorchBackend | OnnxBackend:
    """`backend` None: onnx for an exported model (genai_config.json), else torch."""
    exported = (Path(model) / "genai_config.json").is_file()
    backend = backend or ("onnx" if exported else "torch")
    if backend == "onnx":
        from phitune.errors import PhituneError

        if not exported:
            raise PhituneError(
                f"{model}: not an ONNX Runtime GenAI model (no genai_config.json); "
                f"export it first: phitune export onnx {model} --output {model}-onnx"
            )
        onnx = OnnxBackend(model)
        if adapter:
            # A name from `phitune export onnx BASE --adapter NAME=...`, or an .onnx_adapter file.
            file = (
                Path(adapter)
                if adapter.endswith(".onnx_adapter")
                else Path(model) / "adapters" / f"{adapter}.onnx_adapter"
            )
            if not file.is_file():
                known = sorted(p.stem for p in (Path(model) / "adapters").glob("*.onnx_adapter"))
                raise PhituneError(
                    f"--adapter {adapter}: no {file}; this export has "
                    + (f"the adapters {', '.join(known)}" if known else "no adapters")
                )
            onnx.load_adapter(str(file), file.stem)
            onnx.active = file.stem
        return onnx
    from phitune.models import load_for_inference

    return TorchBackend(*load_for_inference(model, adapter))


class TorchBackend:
    """A PyTorch model: through phitune's inference engine when it runs the model (see
    `inference.local`), else transformers' generate."""

    name = "torch"

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._engine: tuple | None | bool = False  # False: not made yet; None: the engine cannot run it

    def _local(self):
        if self._engine is False:
            from phitune.inference.local import local_engine

            positions = getattr(self.model.config, "max_position_embeddings", None) or 4096
            self._engine = local_engine(self.model, self.tokenizer, max_batch=1, tokens=positions)
        return self._engine

    def stream(
        self,
        messages: list[dict],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        top_p: float = 1.0,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Text pieces as they are generated. Closing the iterator early stops the generation too.
        Setting `cancel` (from any thread) stops it at the next token."""
        from phitune.inference.prompts import prompt_ids

        ids = prompt_ids(self.tokenizer, messages)
        local = self._local()
        if local is None:
            yield from self._stream_transformers(ids, max_new_tokens, temperature, seed, top_p, cancel)
            return
        from phitune.inference.local import stream_one
        from phitune.inference.sampling import Sampling

        engine, lora = local
        room = (engine.positions or len(ids) + max_new_tokens) - len(ids)
        if room < 1:
            raise PhituneError(
                f"the prompt is {len(ids)} tokens; the model takes at most {engine.positions}: shorten the conversation"
            )
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed, max_tokens=min(max_new_tokens, room))
        yield from stream_one(engine, lora, ids, sampling, cancel)

    def _stream_transformers(self, ids, max_new_tokens, temperature, seed, top_p, cancel) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from phitune.inference.prompts import end_of_turn_ids

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        cancel = cancel or threading.Event()
        ids = torch.tensor([ids], device=self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=end_of_turn_ids(self.model, self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            use_cache=True,
            stopping_criteria=StoppingCriteriaList([Cancelled()]),
        )
        if temperature > 0:
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        failed: list[BaseException] = []
        worker = threading.Thread(target=self._generate, args=(failed,), kwargs=kwargs, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            cancel.set()
            worker.join()
        if failed:
            raise PhituneError(f"generation failed: {type(failed[0]).__name__}: {failed[0]}") from failed[0]

    def _generate(self, failed: list, **kwargs) -> None:
        """generate() in the streaming thread; an error ends the stream (else the reader waits
        for text forever) and is raised again by `stream`."""
        import torch

        try:
            with torch.no_grad():
                self.model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            failed.append(exc)
            kwargs["streamer"].end()


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: str) -> None:
        og = require_genai()
        self.og = og
        self.path = path
        self.model = og.Model(str(path))
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters: Any = None
        self.active: str | None = None  # the adapter used when a call names none

    def load_adapter(self, file: str, name: str) -> None:
        """An ONNX Runtime adapter (`.onnx_adapter`) to switch to per request by name."""
        if self.adapters is None:
            self.adapters = self.og.Adapters(self.model)
        self.adapters.load(str(file), name)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(t) for t in self.tokenizer.encode(text)]

    def generate_ids(
        self,
        ids: list[int],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        adapter: str | None = None,
    ) -> Iterator[int]:
        params = self.og.GeneratorParams(self.model)
        options: dict[str, Any] = dict(max_length=len(ids) + max_new_tokens, do_sample=temperature > 0)
        if temperature > 0:
            options |= {"temperature": temperature, "random_seed": seed}
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        adapter = adapter or self.active
        if adapter:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens([ids])
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.stop_ids:
                break
            yield token

    @property
    def stop_ids(self) -> set[int]:
        return {int(t) for t in self.tokenizer.eos_token_ids}

    def stream(
        self,
        messages: list[dict],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        adapter: str | None = None,
    ) -> Iterator[str]:
        decoder = self.tokenizer.create_stream()
        for token in self.generate_ids(
            self.prompt_ids(messages),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            adapter=adapter,
        ):
            yield decoder.decode(token)


def complete(backend: TorchBackend | OnnxBackend, messages: list[dict], **kwargs: Any) -> str:
    return "".join(backend.stream(messages, **kwargs)).strip()
