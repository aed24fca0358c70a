"""The step loop: requests in, one scheduled batch per ``step()``, deltas out. Runs on the engine thread only
(except ``check_prompt``, which is pure and thread-safe).

A step is pipelined with the device: ``step()`` collects the step in flight (the one host sync), decides which
sequences finish (end of sequence, lengths), launches the next step, and only then detokenizes and builds the
deltas of the collected one, so that work (and the caller streaming them out) overlaps the device running the
next step. Tokens whose text decides what comes next (stop strings, output grammars), failures and a request's
first token are handled before the launch, as before.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

import torch

from ..config import EngineConfig
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..text_checks import check_unicode
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .loading import LoadedModel, load
from .model_runner import ModelRunner
from .request import Request
from .scheduler import Scheduler
from .sequence import Sequence

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        loaded: LoadedModel = load(config)
        self.loaded = loaded
        self.device, self.dtype = loaded.device, loaded.dtype
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.model_name
        self.max_seq_len = loaded.max_seq_len
        self.eos_token_ids = loaded.eos_token_ids
        self.eos_token_set = frozenset(loaded.eos_token_ids)
        self.vocab_size = loaded.vocab_size
        self.runner = ModelRunner(loaded.model, config, self.device, self.dtype, self.max_seq_len, self.eos_token_ids)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.max_batch_size, config.max_num_tokens, self.block_manager)
        self.requests: dict[str, Request] = {}
        self._in_flight = None  # (ScheduledBatch, LaunchedStep) queued on the device, collected by the next step()
        self._guided = self._start_guided()  # builds the grammar vocabulary in the background, now
        self._bitmask = None  # guided.GrammarBitmask, made with the first guided step
        self._awaiting_grammar: dict[str, Future] = {}  # request id -> its matchers, compiling in the pool
        self._formatter = None
        self.counters = {"requests": 0, "max_running_seqs": 0, "max_batch_tokens": 0, "errors": 0}

    # ---- pure helpers (any thread) -----------------------------------------------------------------------
    @property
    def formatter(self):
        if self._formatter is None:
            from ..chat_request import ChatRequestBuilder

            self._formatter = ChatRequestBuilder(self.tokenizer, self.loaded.model_dir)
        return self._formatter

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str or a list of token ids, got {type(text).__name__}")
        check_unicode(text, "the prompt")
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def check_prompt(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Token ids for ``prompt``, or a ValueError that names the problem and the fix."""
        if not isinstance(prompt, (str, list, tuple)):
            raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty; pass at least one token of text")
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size}); got {bad[:5]}")
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_seq_len is {self.max_seq_len}; shorten it, set "
                "SamplingParams(truncate_prompt_tokens=N) to keep the last N tokens, or build with a larger "
                "max_seq_len")
        if params.guided_json is not None:
            from ..guided import check_json_schema

            check_json_schema(params.guided_json, "guided_json")
        room = self.max_seq_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {len(ids)} tokens and max_seq_len is "
                f"{self.max_seq_len}, leaving room for {room}; lower max_tokens or pass max_tokens=None")
        return ids

    # ---- requests (engine thread) ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """A guided request waits, unscheduled, until its grammar is compiled (in the pool); others keep running."""
        grammar = self._guided_decoder().matchers_async(params.guided_json, params.n) if (
            params.guided_json is not None) else None
        seqs = [Sequence(request_id, prompt_token_ids, params, index=i) for i in range(params.n)]
        detoks = [IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params) for _ in seqs]
        self.requests[request_id] = Request(request_id, params, prompt_token_ids, seqs, detoks)
        if grammar is None:
            for seq in seqs:
                self.scheduler.add(seq)
        else:
            self._awaiting_grammar[request_id] = grammar
        self.counters["requests"] += 1

    def abort_request(self, request_id: str) -> None:
        self._awaiting_grammar.pop(request_id, None)
        if self.requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._in_flight is not None

    def _start_guided(self):
        """The grammar vocabulary, built in the background from the start; None without xgrammar (a guided request
        then fails with the ImportError that says how to install it)."""
        try:
            from ..guided import GuidedDecoder

            return GuidedDecoder(self.tokenizer, self.vocab_size, stop_token_ids=self.eos_token_ids)
        except ImportError:
            return None

    def _guided_decoder(self):
        if self._guided is None:
            from ..guided import import_xgrammar

            import_xgrammar()  # raises the ImportError that says how to install it
        return self._guided

    def _admit_compiled(self) -> list[RequestOutput | None]:
        """Requests whose grammar is compiled join the scheduler; a failed compile fails its request alone."""
        outputs = []
        for request_id, grammar in list(self._awaiting_grammar.items()):
            if not grammar.done():
                continue
            del self._awaiting_grammar[request_id]
            req = self.requests.get(request_id)
            if req is None:
                continue  # aborted while compiling
            try:
                req.matchers = grammar.result()
            except Exception as exc:  # noqa: BLE001 - the schema's fault: this request fails, the others run
                outputs.append(self._fail(request_id, str(exc) or type(exc).__name__))
                continue
            for seq in req.seqs:
                self.scheduler.add(seq)
        return outputs

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Collect the step in flight, launch the next, then build the deltas that could wait (see the module
        docstring). Returns the deltas (and failures) to stream."""
        outputs, deferred = self._collect()
        if not any(first for first, _ in outputs):  # a first token goes out now: time to first token counts
            outputs += [(False, o) for o in self._launch()]
        outputs += [(False, self._emit(*item)) for item in deferred]
        return [o for _, o in outputs if o is not None]

    def _launch(self) -> list[RequestOutput | None]:
        """Schedule the next batch and queue it on the device; returns the deltas of requests that failed."""
        outputs = self._admit_compiled()
        batch = self.scheduler.schedule()
        outputs += [self._fail(seq.request_id, seq.error or "the request cannot be scheduled") for seq in batch.failed]
        if not batch.seqs:
            if self._awaiting_grammar and self._in_flight is None:  # only compiles to wait for: do not spin
                wait(list(self._awaiting_grammar.values()), timeout=0.01, return_when=FIRST_COMPLETED)
            return outputs
        self.counters["max_running_seqs"] = max(self.counters["max_running_seqs"], len(batch.seqs))
        self.counters["max_batch_tokens"] = max(self.counters["max_batch_tokens"], sum(batch.num_query_tokens))
        allowed, failed = self._grammar_masks(batch)
        if failed:  # their blocks are freed: take them out of this step
            outputs += [self._fail(rid, msg) for rid, msg in failed]
            batch = self._only_live(batch)
            # Blocks they registered for prefix reuse when scheduled will never be computed now.
            self.block_manager.reset_prefix_cache()
            if not batch.seqs:
                return outputs
            allowed, _ = self._grammar_masks(batch)  # the rows of the requests that failed are gone
        try:
            self._in_flight = (batch, self.runner.launch(batch, allowed))
        except Exception as exc:  # e.g. out of memory on a huge prefill: fail this batch, keep serving
            outputs += self._fail_batch(batch, exc)
        return outputs

    def _collect(self) -> tuple[list[tuple[bool, RequestOutput | None]], list[tuple]]:
        """Wait for the step in flight and account its tokens. Returns (deltas built now, each flagged when it
        carries a request's first token; (request, seq, token, logprobs, finish) whose delta can wait)."""
        if self._in_flight is None:
            return [], []
        batch, launched = self._in_flight
        self._in_flight = None
        try:
            tokens, logprobs = self.runner.collect(launched)
        except Exception as exc:  # an error the device reports at the sync
            return [(False, o) for o in self._fail_batch(batch, exc)], []
        self.scheduler.postprocess(batch, tokens)
        now = time.perf_counter()
        outputs, deferred = [], []
        for seq, token, top in zip(batch.seqs, tokens, logprobs):
            req = self.requests.get(seq.request_id)
            if token is None or req is None:
                continue
            try:
                first = req.metrics.first_token_time is None
                finish = self._account(req, seq, token, now)
                if first or req.matchers or req.params.stop:
                    outputs.append((first, self._emit(req, seq, token, top, finish)))
                else:
                    deferred.append((req, seq, token, top, finish))
            except Exception as exc:  # one request's fault fails that request only
                logger.exception("request %s failed", seq.request_id)
                outputs.append((False, self._fail(seq.request_id, f"{type(exc).__name__}: {exc}")))
        return outputs, deferred

    def _fail_batch(self, batch, exc: Exception) -> list[RequestOutput | None]:
        logger.error("model step failed", exc_info=exc)
        self.block_manager.reset_prefix_cache()  # blocks registered this step hold no valid KV
        message = f"the model step failed: {type(exc).__name__}: {exc}"
        return [self._fail(s.request_id, message) for s in batch.seqs]

    def _grammar_masks(self, batch):
        """The step's grammar masks: the rows of the guided sampled sequences, filled in place by xgrammar and sent
        in one copy. Returns (TokenBitmask on the device, or None when no row is guided; [(request id, why)] for
        requests whose grammar cannot continue)."""
        guided, rows, num_sampled = [], [], 0
        for seq, samples in zip(batch.seqs, batch.samples):
            if not samples:
                continue
            req = self.requests.get(seq.request_id)
            if req is not None and req.matchers:
                guided.append((seq, req))
                rows.append(num_sampled)
            num_sampled += 1
        if not guided:
            return None, []
        if self._bitmask is None:
            from ..guided import GrammarBitmask

            self._bitmask = GrammarBitmask(self.config.max_batch_size, self.vocab_size, self.device)
        self._bitmask.fill([req.matchers[seq.index] for seq, req in guided])
        failed = []
        for k, ((seq, req), allows_any) in enumerate(zip(guided, self._bitmask.allows_any())):
            if not allows_any:
                failed.append((seq.request_id, "the output grammar allows no next token; check the JSON schema"))
            elif (seq.num_output_tokens < req.params.min_tokens
                  and not self._bitmask.allows_other_than(k, self.eos_token_ids)):
                failed.append((seq.request_id, (
                    f"the output grammar is complete after {seq.num_output_tokens} tokens but "
                    f"min_tokens={req.params.min_tokens} forbids stopping; lower min_tokens for guided output")))
        if failed:
            return None, failed
        return self._bitmask.to_device(None if len(rows) == num_sampled else rows), []

    def _only_live(self, batch):
        """The batch without the sequences of requests that failed this step."""
        keep = [i for i, seq in enumerate(batch.seqs) if seq.request_id in self.requests]
        return dataclasses.replace(batch, seqs=[batch.seqs[i] for i in keep],
                                   num_query_tokens=[batch.num_query_tokens[i] for i in keep],
                                   samples=[batch.samples[i] for i in keep])

    def _account(self, req: Request, seq: Sequence, token: int, now: float) -> str | None:
        """Count one sampled (already appended) token; the finish reason its id alone decides (end of sequence,
        lengths, a completed grammar). A finished sequence leaves the scheduler now, before the next launch."""
        if token < 0:
            raise FloatingPointError("the model produced non-finite logits (NaN/inf) for this request")
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.completion_tokens += 1
        finish = seq.check_token_stop(self.eos_token_set, self.max_seq_len)
        if req.matchers:
            matcher = req.matchers[seq.index]
            if not matcher.accept(token):
                raise ValueError(f"token {token} was rejected by the output grammar")
            if matcher.is_terminated() and finish is None:
                finish = "stop"
        if finish is not None:
            self.scheduler.finish(seq)
        return finish

    def _emit(self, req: Request, seq: Sequence, token: int, top: dict[int, float] | None,
              finish: str | None) -> RequestOutput | None:
        """The text delta of one accounted token (stop strings end the sequence here)."""
        if seq.request_id not in self.requests:
            return None  # aborted (or failed) since the token was accounted
        try:
            detok = req.detokenizers[seq.index]
            if finish == "stop" and token in self.eos_token_set | set(req.params.stop_token_ids):
                text = detok.flush()  # the stop token itself is never shown
            else:
                text, stop_hit = detok.step([token])
                if stop_hit:
                    finish = "stop"
                    self.scheduler.finish(seq)
                elif finish is not None:
                    text += detok.flush()
        except Exception as exc:  # one request's fault fails that request only
            logger.exception("request %s failed", seq.request_id)
            return self._fail(seq.request_id, f"{type(exc).__name__}: {exc}")
        if finish is not None:
            req.num_finished += 1
        out = req.delta(seq, text, [token], finish, top)
        if req.finished:
            del self.requests[seq.request_id]
        return out

    def _fail(self, request_id: str, message: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(request_id)
        self.counters["errors"] += 1
        return req.error(message)

    # ---- tools (engine thread) ---------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        stats = dict(self.counters)
        stats.update(dataclasses.asdict(self.scheduler.stats))
        stats["free_blocks"] = self.block_manager.num_free_blocks
        stats["total_blocks"] = self.runner.num_blocks
        stats["running_requests"] = len(self.requests)
        stats["awaiting_grammar"] = len(self._awaiting_grammar)  # guided requests whose grammar is compiling
        return stats

    def perplexity(self, token_ids: list[int]) -> float:
        from ..build.perplexity import perplexity

        return perplexity(self.runner.model, token_ids, kv_cache_dtype=self.config.kv_cache_dtype,
                          max_context=self.max_seq_len)

    def save(self, engine_dir: Path) -> Path:
        from ..build import save_engine

        return save_engine(self.runner.model, self.loaded.model_dir, Path(engine_dir))
