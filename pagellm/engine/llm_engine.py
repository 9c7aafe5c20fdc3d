"""The step loop: requests in, one scheduled model step at a time, outputs out.

``add_request`` validates and queues; ``step`` schedules, turns the batch into
a ``StepInput`` (``step.py``), has the worker (``ModelRunner``) run it,
appends the sampled tokens, detokenizes, applies stop conditions and frees
finished sequences; it returns a RequestOutput for every request that changed.
The offline ``LLM`` and the HTTP server both drive this one loop. Step
observers (``add_observer``) see every scheduled batch and every step's
outputs; the benchmarks record per-step figures through them.

One request never fails another: ``SamplingParams`` only admits values the
worker can represent, and if a step raises all the same, its sequences are
run again in halves (``_execute``) until the ones that fail alone are found;
their requests end with ``finish_reason="error"`` and ``RequestOutput.error``
and the rest of the step goes on. Re-running is safe: a step only writes the
K/V of its own new tokens (the same values again) and sampling is a pure
function of each sequence's seed and progress, so the survivors draw the
tokens they would have drawn in the whole step.

The asynchronous step pipeline (``async_scheduling``, on by default): ``step``
schedules and launches step N+1 while the device still runs step N, and only
then reads step N's tokens (one wait per step, on an event behind N's copy of
its tokens to the host), appends them, detokenizes and checks stops. A
sequence that samples in a step gets a placeholder token at launch
(``Sequence.num_pending``) and its computed count advances then; the next step
feeds it the token from the device (``StepInput.deferred``). Every device
write of step N precedes those of step N+1 (one stream), so blocks freed
while a step is in flight (an abort, a stop, a preemption, a swap) are reused
only after it wrote them. A sequence found finished when N's tokens are read
has been launched once more in N+1: that token is discarded (one wasted slot;
none for a length limit, which the scheduler sees coming). The rule for the
synchronous fallback: a step waits for the previous one's tokens before it is
scheduled while any request in the engine needs the host's tokens for its
next step (structured outputs: the grammar mask; penalties: the token
history; prompt log-probs: which positions are scored), with speculative
decoding (proposals are made from the tokens), under tensor/pipeline
parallelism (the ranks would need the draws: not done yet), and for the step
after one that had to be split to isolate a failure. Greedy and seeded tokens
are the same either way (draws depend on each sequence's own seed and
position only).
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

from pagellm.config import EngineConfig
from pagellm.engine.block_manager import BlockManager
from pagellm.engine.detokenizer import IncrementalDetokenizer
from pagellm.engine.host_blocks import HostBlockPool, HostCopies, HostTierStats
from pagellm.engine.parallel import Workers, open_model, start_runner
from pagellm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from pagellm.engine.sequence import Sequence, SequenceStatus
from pagellm.engine.model_runner import PendingOutput
from pagellm.engine.step import PreviousStep, StepOutput, build_step_input
from pagellm.engine.structured import GrammarCompiler
from pagellm.inputs import Prompt, TokenizedPrompt
from pagellm.outputs import CompletionOutput, Logprob, RequestOutput
from pagellm.sampling_params import SamplingParams
from pagellm.spec import make_proposer, open_draft
from pagellm.spec.stats import SpecStats
from pagellm.utils.math import cdiv

logger = logging.getLogger("pagellm")
PREFIX_CHARS_PER_TOKEN = 8   # longer prompts are checked on a prefix first (LLMEngine.encode)


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    stream: bool = True
    unforked: list[Sequence] = field(default_factory=list)  # samples 1..n-1 until the prompt is computed
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass
class LaunchedStep:
    """A step on the device whose tokens the host has not read yet."""
    batch: ScheduledBatch
    done: list[tuple[Sequence, PendingOutput, int]]   # per sequence: its step output and its index there
    failed: dict[str, Exception]
    outputs: list[RequestOutput]         # of the requests that failed at launch
    previous: PreviousStep | None        # how the next step finds its draws on the device; None: read them first


class StepObserver(Protocol):
    """Sees each step from outside the engine (benchmarks, tracing)."""

    def on_schedule(self, batch: ScheduledBatch) -> None:
        """After scheduling, before the model runs (``batch`` may be empty)."""

    def on_step(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> None:
        """After the step's tokens were appended and its outputs made."""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        start = time.perf_counter()
        self.model_config, checkpoint, weights, self.tokenizer = open_model(config)
        positions = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > positions:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context length {positions}")
        self.max_model_len = config.max_model_len or positions
        self.workers = Workers.connect(config, self.max_model_len)   # None on one process
        try:
            draft = open_draft(config, self.model_config, self.max_model_len, open_model)
            self.runner, self.quantization = start_runner(config, self.model_config, checkpoint, weights,
                                                          self.max_model_len, self.workers and self.workers.groups,
                                                          draft)
        except Exception:
            self.close()
            raise
        loaded = time.perf_counter()
        self.memory = self.runner.memory
        num_host_blocks = self.memory.num_host_blocks
        host = HostBlockPool(num_host_blocks) if num_host_blocks else None
        num_blocks = self.runner.kv_cache.num_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          self.model_config.sliding_window, self.runner.kv_cache.null_block, host)
        speculating = config.speculative_method is not None
        self.scheduler = Scheduler(SchedulerConfig(
            config.max_num_seqs, config.batched_tokens, self.max_model_len, config.swap_min_tokens,
            num_lookahead=config.num_speculative_tokens if speculating else 0,
            lookahead_max_seqs=config.speculative_max_batch,
            max_prefill_tokens_with_decodes=config.prefill_tokens_with_decodes), self.block_manager)
        self.proposer = make_proposer(config, draft, num_blocks)
        self.spec_stats = SpecStats()
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        self.requests: dict[str, RequestState] = {}
        self._num_unforked = 0   # samples waiting for their request's prompt (not in the scheduler yet)
        self._seq_ids = itertools.count()
        self._seed_source = random.Random(config.seed)
        self.observers: list[StepObserver] = []
        self._pin_memory = self.runner.device.type == "cuda"
        self.overlap = config.async_scheduling and not speculating and config.world_size == 1
        self._host_token_requests: set[str] = set()   # requests whose steps need the host's tokens (sync)
        self._step_ids = itertools.count()
        self._in_flight: LaunchedStep | None = None
        # Start-up beyond reading weights: activation profile, KV pool, CUDA graph capture.
        self.startup_seconds = {"load_weights": loaded - start, "ready_after_load": time.perf_counter() - loaded}
        logger.info(self.runner.memory.summary())
        logger.info(f"ready {self.startup_seconds['ready_after_load']:.1f} s after loading weights "
                    f"({self.startup_seconds['load_weights']:.1f} s)")

    def close(self) -> None:
        """Let the other parallel ranks go (spawned workers exit); nothing to do on one process."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    # ---- requests ------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt; safe to call from any thread."""
        if isinstance(prompt, TokenizedPrompt):
            return prompt.text, self._check_ids(prompt.token_ids)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("prompt must be token ids: this model has no tokenizer")
            return prompt, self.encode(prompt)
        return None, self._check_ids(list(prompt))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. A text longer than ``PREFIX_CHARS_PER_TOKEN``
        characters per token of the context is first tokenized in part: when
        that prefix alone makes twice as many tokens as the context holds, the
        text is refused without tokenizing the rest (a text never makes fewer
        tokens than its prefix, save the one word the cut splits), so a
        maximum-size body costs a fraction of its tokenization (which holds the
        GIL in stretches that stall every stream)."""
        prefix_chars = PREFIX_CHARS_PER_TOKEN * self.max_model_len
        if len(text) > prefix_chars:
            prefix_tokens = len(self.tokenizer.encode(text[:prefix_chars], add_special_tokens=add_special_tokens))
            if prefix_tokens > 2 * self.max_model_len:
                raise ValueError(f"prompt is more than {prefix_tokens} tokens (its first {prefix_chars} characters "
                                 f"alone), but max_model_len is {self.max_model_len}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("prompt_token_ids is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}); got {bad[:5]}")
        return ids

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    stream: bool = True) -> None:
        """Queue a request. ``stream=False``: ``step`` reports it only once finished."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        vocab = self.model_config.vocab_size
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs must be at most the vocabulary size {vocab}, got {params.logprobs}")
        text, ids = self.tokenize(prompt)
        max_tokens = self._check_length(len(ids), params)
        if params.max_tokens is None:
            params = _with_max_tokens(params, max_tokens)
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
        now = time.monotonic()
        seqs = [Sequence(next(self._seq_ids), request_id, i, ids, params, seed, now,
                         grammar=grammar.matcher() if grammar else None) for i in range(params.n)]
        detokenizers = [IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop_strings,
                                               params.include_stop_str_in_output) for _ in seqs]
        if params.structured_outputs or params.has_penalties or params.prompt_logprobs is not None:
            self._host_token_requests.add(request_id)
        self.requests[request_id] = RequestState(request_id, text, ids, params, seqs, detokenizers, now,
                                                 stream=stream, unforked=seqs[1:])
        self._num_unforked += len(seqs) - 1
        self.scheduler.add(seqs[0])

    def _check_length(self, prompt_len: int, params: SamplingParams) -> int:
        limit = self.max_model_len
        if prompt_len >= limit:
            raise ValueError(f"prompt is {prompt_len} tokens, but max_model_len is {limit} "
                             f"(the prompt must leave room for at least one generated token)")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise ValueError(f"max_tokens {max_tokens} + prompt length {prompt_len} exceeds max_model_len {limit}")
        held = prompt_len + max_tokens
        if self.model_config.sliding_window:   # blocks behind the window are given back as it advances
            held = min(held, self.model_config.sliding_window + self.config.batched_tokens + self.config.block_size)
        blocks = cdiv(held, self.config.block_size)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) needs {blocks} KV blocks, "
                             f"more than the whole pool ({self.block_manager.num_blocks})")
        return max_tokens

    def abort_request(self, request_id: str) -> None:
        """End a request (unknown ids are ignored): O(its number of sequences)."""
        state = self._pop_request(request_id)
        if state is not None:
            self._end(state, "abort")

    def _pop_request(self, request_id: str) -> RequestState | None:
        self._host_token_requests.discard(request_id)
        return self.requests.pop(request_id, None)

    def _end(self, state: RequestState, reason: str) -> None:
        """Finish every unfinished sequence of a request that was removed from ``requests``."""
        self._num_unforked -= len(state.unforked)
        state.unforked = []
        for seq in state.seqs:
            if not seq.finished:
                seq.finish_reason = reason
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_observer(self, observer: StepObserver) -> None:
        self.observers.append(observer)

    def remove_observer(self, observer: StepObserver) -> None:
        self.observers.remove(observer)

    # ---- the step ------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch the next step, then read the tokens of the step
        launched before (the asynchronous pipeline) or of this one (synchronous)."""
        outputs = []
        if self._in_flight is not None and not self._overlapping:
            outputs += self._complete(self._in_flight)   # the next step needs these tokens on the host
            self._in_flight = None
        batch = self.scheduler.schedule()
        for observer in self.observers:
            observer.on_schedule(batch)
        launched = self._launch(batch) if batch else None
        if self._in_flight is not None:
            outputs += self._complete(self._in_flight)
            self._in_flight = None
        if launched is not None and launched.previous is not None:
            self._in_flight = launched
        elif launched is not None:
            outputs += self._complete(launched)
        return outputs

    @property
    def step_in_flight(self) -> bool:
        """A launched step's tokens are still to be read (the device may be busy)."""
        return self._in_flight is not None

    @property
    def _overlapping(self) -> bool:
        return self.overlap and not self._host_token_requests

    def _launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Run a batch up to the device: every sequence that samples gets a placeholder for its token."""
        if batch.lookahead:
            self.proposer.propose(batch)
        host = self.block_manager.host
        step_id = next(self._step_ids) if self._overlapping else None
        previous = self._in_flight.previous if self._in_flight is not None else None
        done, failed = self._execute(batch, self.block_manager.take_pending_copies(),
                                     host.take_swaps() if host is not None else HostCopies.none(), previous, step_id)
        rows: dict[Sequence, int] = {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                rows[seq] = len(rows)
                seq.add_placeholder()
        outputs = [self._fail(request_id, exc) for request_id, exc in failed.items()]
        whole = not failed and all(pending is done[0][1] for _, pending, _ in done)
        return LaunchedStep(batch, done, failed, outputs,
                            PreviousStep(step_id, rows) if step_id is not None and whole else None)

    def _complete(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's tokens and append them; a sequence that ended
        (or whose request did) since the launch drops its token."""
        batch, failed = launched.batch, {}
        now = time.monotonic()
        changed: dict[str, RequestState] = {}
        for seq, pending, index in launched.done:
            if seq.finished or seq.request_id in launched.failed:
                continue
            result = pending.result()
            if result.scored is not None and result.scored[index]:
                seq.prompt_logprobs.extend(self._logprob_entry(target, s.logprob, s.top[:seq.params.prompt_logprobs],
                                                               s.rank)
                                           for target, s in zip(self._scored_targets(seq, result, index),
                                                                result.scored[index]))
            if seq in batch.proposals:
                self.spec_stats.record(len(batch.proposals[seq].token_ids), len(result.token_ids[index]) - 1)
            if result.token_ids[index]:
                state = self.requests[seq.request_id]
                try:
                    self._append(state, seq, result, index, now)
                except Exception as exc:   # e.g. a grammar refusing a token: that request's fault alone
                    failed[seq.request_id] = exc
                changed[state.request_id] = state
        for seq in batch.seqs:   # after forking: a fork still needs its parent's blocks; not if preempted since
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.free_outside_window(seq)
                if seq in batch.lookahead:
                    self.block_manager.release_unverified(seq)
        if self.proposer is not None:
            self.proposer.retain(self.scheduler.running)
        outputs = launched.outputs + [self._fail(request_id, exc) for request_id, exc in failed.items()]
        outputs += [self._finish_or_report(state, now) for request_id, state in changed.items()
                    if request_id not in failed and (state.stream or state.finished)]
        for observer in self.observers:
            observer.on_step(batch, outputs)
        return outputs

    def _execute(self, batch: ScheduledBatch, copies: list[tuple[int, int]], swaps: HostCopies = HostCopies.none(),
                  previous: PreviousStep | None = None, step_id: int | None = None
                  ) -> tuple[list[tuple[Sequence, PendingOutput, int]], dict[str, Exception]]:
        """Launch a batch on the worker: per sequence (sequence, pending step
        output, its index there), and the requests whose sequences failed even
        alone. A batch that raises is run again in halves, each with the block
        copies into its own blocks (copying again is harmless: the step rewrites
        what follows); the host swaps ran before the forward that raised and are
        not repeated."""
        try:   # under pipeline parallelism, a micro-batch per stage keeps every stage busy (swaps go first)
            parts = _split(batch, copies, self.config.pipeline_parallel_size)
            result = self.runner.launch(*[build_step_input(part, self.config.block_size, part_copies,
                                                           pin_memory=self._pin_memory,
                                                           swaps=swaps if i == 0 else HostCopies.none(),
                                                           previous=previous, step_id=step_id)
                                          for i, (part, part_copies) in enumerate(parts)])
            return [(seq, result, index) for index, seq in enumerate(batch.seqs)], {}
        except Exception as exc:
            if self.workers is not None and (failure := self.workers.failure(exc)) is not None:
                raise failure from exc
            if len(batch.seqs) == 1:
                logger.error(f"request {batch.seqs[0].request_id} failed its step", exc_info=exc)
                return [], {batch.seqs[0].request_id: exc}
        done, failed = [], {}
        for half, half_copies in _split(batch, copies, 2):
            half_done, half_failed = self._execute(half, half_copies, previous=previous)
            done += half_done
            failed |= half_failed
        return done, failed

    def _fail(self, request_id: str, error: Exception) -> RequestOutput:
        """End a request the engine could not run; its blocks leave the prefix cache (their K/V may be unwritten)."""
        state = self._pop_request(request_id)
        state.error = f"{type(error).__name__}: {error}"
        for seq in state.seqs:
            self.block_manager.forget(seq)
        self._end(state, "error")
        state.finished_time = time.monotonic()
        return self.make_output(state)

    def _append(self, state: RequestState, seq: Sequence, result: StepOutput, index: int, now: float) -> None:
        """Append the tokens ``seq`` got this step, one by one through the stop
        checks: one sampled token, or accepted proposals and the target's token
        after them (the K/V of each token but the last is already in the cache)."""
        for i, token in enumerate(result.token_ids[index]):
            seq.num_computed_tokens += i > 0
            seq.append_token(token)
            if seq.grammar is not None:
                seq.grammar.accept(token)
            if state.unforked:
                self._fork_samples(state, seq)
            if state.params.logprobs is not None:
                logprob = result.logprobs[index][i]
                seq.cumulative_logprob += logprob
                top = result.top_logprobs[index][i][:state.params.logprobs] if result.top_logprobs else []
                seq.logprobs.append(self._logprob_entry(token, logprob, top))
            if state.first_token_time is None:
                state.first_token_time = now
            detokenizer = state.detokenizers[seq.sample_index]
            stop_string = detokenizer.push(token)
            reason = self._stop_reason(seq, token, stop_string)
            if reason is not None:
                if stop_string is None:
                    detokenizer.flush()
                seq.finish_reason, seq.stop_reason = reason
                self.scheduler.finish(seq)
                return

    def _fork_samples(self, state: RequestState, parent: Sequence) -> None:
        """The prompt of an n > 1 request is computed once, by its first sample;
        the others then share its blocks and recompute only the last prompt
        token, to draw their own first token from the same logits."""
        for child in state.unforked:
            self.block_manager.fork(parent, child, child.num_tokens - 1)
            self.scheduler.add(child, front=True)
        self._num_unforked -= len(state.unforked)
        state.unforked = []

    def _stop_reason(self, seq: Sequence, token: int, stop_string: str | None
                     ) -> tuple[str, int | str | None] | None:
        params = seq.params
        num_output = seq.num_known_tokens - seq.num_prompt_tokens   # a later placeholder does not count
        if seq.grammar is not None and seq.grammar.terminated:
            return "stop", None
        if num_output >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                return "stop", None
            if token in params.stop_token_ids:
                return "stop", token
            if stop_string is not None:
                return "stop", stop_string
        if num_output >= params.max_tokens or seq.num_known_tokens >= self.max_model_len:
            return "length", None
        return None

    @staticmethod
    def _scored_targets(seq: Sequence, result: StepOutput, index: int) -> list[int]:
        """The prompt tokens this step scored for ``seq``: the next ones after those already held."""
        done = len(seq.prompt_logprobs)
        return seq.token_ids[done + 1:done + 1 + len(result.scored[index])]

    def _logprob_entry(self, token: int, logprob: float, top: list[tuple[int, float]],
                       rank: int | None = None) -> dict[int, Logprob]:
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: None)
        entry = {tid: Logprob(lp, i + 1, decode(tid)) for i, (tid, lp) in enumerate(top)}
        if token not in entry:
            entry[token] = Logprob(logprob, rank, decode(token))
        return entry

    def _finish_or_report(self, state: RequestState, now: float) -> RequestOutput:
        finished = state.finished
        if finished:
            state.finished_time = now
            self._pop_request(state.request_id)
        return self.make_output(state)

    def make_output(self, state: RequestState) -> RequestOutput:
        outputs = [CompletionOutput(
            index=seq.sample_index, text=detok.visible_text(seq.finished), token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob if state.params.logprobs is not None else None,
            logprobs=seq.logprobs if state.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
            for seq, detok in zip(state.seqs, state.detokenizers)]
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        if state.finished_time is not None:
            metrics["finished_time"] = state.finished_time
        prompt_logprobs = None if state.params.prompt_logprobs is None else [None, *state.seqs[0].prompt_logprobs]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs, state.finished, metrics,
                             prompt_logprobs, state.error)

    def stats(self) -> dict[str, float]:
        """Counters only (no iteration), so another thread may read them during a step."""
        bm, sched = self.block_manager, self.scheduler
        host = bm.host.stats if bm.host is not None else HostTierStats()
        per_block = self.runner.kv_spec.bytes_per_block
        return {"num_running": len(sched.running), "num_waiting": len(sched.waiting) + self._num_unforked,
                "kv_blocks_used": bm.num_used_blocks, "kv_blocks_total": bm.num_blocks,
                "kv_usage": bm.num_used_blocks / bm.num_blocks, "num_preemptions": sched.stats.num_preemptions,
                "num_prefill_tokens": sched.stats.num_prefill_tokens,
                "num_decode_tokens": sched.stats.num_decode_tokens,
                "prefix_cache_hit_rate": bm.stats.hit_rate, "num_swapped_out": host.swapped_out_seqs,
                "host_prefix_hit_tokens": host.hit_tokens, "kv_bytes_to_host": host.blocks_to_host * per_block,
                "kv_bytes_to_device": host.blocks_to_device * per_block,
                "spec_num_proposed": self.spec_stats.num_proposed, "spec_num_accepted": self.spec_stats.num_accepted,
                "spec_acceptance_rate": self.spec_stats.acceptance_rate,
                "spec_mean_tokens_per_step": self.spec_stats.mean_tokens_per_step}


def _split(batch: ScheduledBatch, copies: list[tuple[int, int]], parts: int
           ) -> list[tuple[ScheduledBatch, list[tuple[int, int]]]]:
    """Up to ``parts`` runs of consecutive sequences, each with the block copies into its own blocks
    (and the batch's speculative proposals, keyed by sequence)."""
    size = cdiv(len(batch.seqs), min(parts, len(batch.seqs)))
    out = []
    for start in range(0, len(batch.seqs), size):
        part = ScheduledBatch(batch.seqs[start:start + size], batch.num_new_tokens[start:start + size],
                              lookahead=batch.lookahead, proposals=batch.proposals)
        blocks = {block for seq in part.seqs for block in seq.block_table}
        out.append((part, [(src, dst) for src, dst in copies if dst in blocks]))
    return out


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return replace(params, max_tokens=max_tokens)
