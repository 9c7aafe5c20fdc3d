"""The offline API, named as vLLM's so its users can switch by changing an import."""
from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from pagellm.config import EngineConfig
from pagellm.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchState
from pagellm.engine.llm_engine import LLMEngine
from pagellm.inputs import Prompt, apply_chat_template, as_prompt_list
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams


class LLM:
    """``LLM("folder-or-file.gguf-or-zoo-name", dtype="bfloat16", kv_cache_memory="4GiB", ...)``;
    keyword arguments are EngineConfig fields (or pass an EngineConfig)."""

    def __init__(self, model: str | EngineConfig, **kwargs) -> None:
        config = model if isinstance(model, EngineConfig) else EngineConfig(model=str(model), **kwargs)
        self.engine = LLMEngine(config)
        self._request_ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        ids = self._submit(prompts, sampling_params, stream=False)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm or len(ids) < 2) as bar:
            for output in self._run():
                if output.finished:
                    finished[output.request_id] = output
                    bar.update(1)
        return [finished[i] for i in ids]

    def stream(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
               | None = None) -> Iterator[RequestOutput]:
        """Yield a cumulative RequestOutput each time a request gains tokens or
        finishes; request ids are consecutive integers (as strings) in prompt order."""
        self._submit(prompts, sampling_params)
        yield from self._run()

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict]) -> list[int]:
        return apply_chat_template(self.engine.tokenizer, conversation,
                                   functools.partial(self.engine.encode, add_special_tokens=False))

    def _submit(self, prompts, sampling_params, stream: bool = True) -> list[str]:
        prompts = as_prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = str(next(self._request_ids))
                self.engine.add_request(request_id, prompt, p or SamplingParams(), stream)
                ids.append(request_id)
        except ValueError:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return ids

    def _run(self) -> Iterator[RequestOutput]:
        while self.engine.has_unfinished_requests():
            yield from self.engine.step()

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search for each prompt (all prompts' beams batched together)."""
        engine = self.engine
        eos = frozenset(engine.eos_token_ids)
        states = [BeamSearchState(engine.tokenize(p)[1], params, eos) for p in as_prompt_list(prompts)]
        while live := [s for s in states if not s.done]:
            beams = [(s, beam) for s in live for beam in s.running]
            ids = self._submit([s.prompt_token_ids + b.tokens for s, b in beams],
                               [s.sampling_params() for s, _ in beams], stream=False)
            finished = {o.request_id: o for o in self._run() if o.finished}
            tops = iter([[(t, lp.logprob) for t, lp in finished[i].outputs[0].logprobs[0].items()
                          if lp.rank is not None] for i in ids])
            for state in live:
                state.advance([next(tops) for _ in state.running])
        for state in states:
            for seq in state.finished:
                seq.text = engine.detokenize(seq.tokens)
        return [BeamSearchOutput(s.prompt_token_ids, s.finished) for s in states]
