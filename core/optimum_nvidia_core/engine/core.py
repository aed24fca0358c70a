"""The engine core: token ids and sampling settings in, one scheduled batch per ``step()``, token ids and
finish reasons out. No tokenizer and no text: the output processor above turns ids into text and stop strings
into aborts. Runs on one thread (its own process's, see ``core_proc``, or an engine thread).

Asynchronous scheduling: ``step()`` schedules and launches step N+1 BEFORE it waits for step N's tokens, so the
device always has the next step queued while the host accounts the last one. Each decoding sequence carries a
placeholder for its token in flight (the scheduler counts it; the model runner feeds it to step N+1 from the
device), and a finish found when step N lands (end of sequence, stop token ids, a grammar) drops the token step
N+1 sampled for it. Lengths (max_tokens, max_seq_len) are known ahead and cost no extra step. A step holding
sequences whose next input needs their newest token on the host (penalties, grammars) is collected first; so is
a step small enough to speculate in (``speculative="ngram"``: ``speculation`` plans and collects its runs).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

import torch

from ..config import EngineConfig
from ..devices import gpu_memory
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .interface import EngineCoreOutput, EngineCoreRequest, EngineInfo, check_token_ids
from .loading import LoadedModel, load
from .model_runner import ModelRunner
from .request import Request
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus
from .speculation import Speculator

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig):
        loaded: LoadedModel = load(config)
        self.config = config = config.with_limits(gpu_memory(loaded.device))  # "auto" step limits resolved
        self.loaded = loaded
        self.device, self.dtype = loaded.device, loaded.dtype
        self.max_seq_len = loaded.max_seq_len
        self.eos_token_ids = loaded.eos_token_ids
        self.eos_token_set = frozenset(loaded.eos_token_ids)
        self.vocab_size = loaded.vocab_size
        self.runner = ModelRunner(loaded.model, config, self.device, self.dtype, self.max_seq_len, self.eos_token_ids)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        # One sequence can never hold more than the whole cache (a small num_kv_blocks): that is its context.
        self.max_seq_len = min(self.max_seq_len, self.runner.num_blocks * config.block_size)
        self.scheduler = Scheduler(config.max_batch_size, config.max_num_tokens, self.block_manager,
                                   max_seq_len=self.max_seq_len)
        self.speculator = Speculator(config, self.block_manager) if config.speculative else None
        self.requests: dict[str, Request] = {}
        self._in_flight = None  # (ScheduledBatch, LaunchedStep) queued on the device, collected by the next step()
        self._guided = self._start_guided()  # builds the grammar vocabulary in the background, now
        self._bitmask = None  # guided.GrammarBitmask, made with the first guided step
        self._awaiting_grammar: dict[str, Future] = {}  # request id -> its matchers, compiling in the pool
        self.counters = {"requests": 0, "max_running_seqs": 0, "max_batch_tokens": 0, "errors": 0}

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_dir=str(self.loaded.model_dir), model_name=self.loaded.model_name, max_seq_len=self.max_seq_len,
            vocab_size=self.vocab_size, eos_token_ids=list(self.eos_token_ids), device=str(self.device),
            num_blocks=self.runner.num_blocks, block_size=self.config.block_size)

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request; its prompt ids were checked by the input processor (``check_token_ids`` guards the
        core against a caller that skipped that)."""
        params = request.params
        check_token_ids(request.prompt_token_ids, params, self.vocab_size)
        # A guided request waits, unscheduled, until its grammar is compiled (in the pool); others keep running.
        grammar = self._guided_decoder().matchers_async(params.guided_json, params.n) if (
            params.guided_json is not None) else None
        seqs = [Sequence(request.request_id, request.prompt_token_ids, params, index=i) for i in range(params.n)]
        self.requests[request.request_id] = Request(request.request_id, params, seqs)
        if grammar is None:
            for seq in seqs:
                self.scheduler.add(seq)
        else:
            self._awaiting_grammar[request.request_id] = grammar
        self.counters["requests"] += 1

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (``index=None``) or one of its completions (a stop string ended it on the output
        side)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        if index is None:
            del self.requests[request_id]
            self._awaiting_grammar.pop(request_id, None)
            self.scheduler.abort(request_id)
            return
        seq = req.seqs[index]
        if not seq.is_finished:
            self.scheduler.finish(seq, "abort")
            req.num_finished += 1
        if req.finished:
            del self.requests[request_id]

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._in_flight is not None

    def _start_guided(self):
        """The grammar vocabulary, built in the background from the start (from the model directory: the core has
        no tokenizer object); None without xgrammar (a guided request then fails with the ImportError that says
        how to install it)."""
        try:
            from ..guided import GuidedDecoder

            return GuidedDecoder(self.loaded.model_dir, self.vocab_size, stop_token_ids=self.eos_token_ids)
        except ImportError:
            return None

    def _guided_decoder(self):
        if self._guided is None:
            from ..guided import import_xgrammar

            import_xgrammar()  # raises the ImportError that says how to install it
        return self._guided

    def _admit_compiled(self) -> list[EngineCoreOutput | None]:
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
                outputs.append(self._fail(request_id, str(exc) or type(exc).__name__, bad_request=True))
                continue
            for seq in req.seqs:
                self.scheduler.add(seq)
        return outputs

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """Launch the next step, then collect the one in flight and return its outputs (see the module
        docstring)."""
        in_flight, self._in_flight = self._in_flight, None
        outputs: list[EngineCoreOutput | None] = []
        if in_flight is not None and in_flight[0].needs_host_tokens:  # its tokens decide the next inputs
            outputs, in_flight = self._collect(in_flight), None
        outputs += self._launch()
        if in_flight is not None:
            outputs += self._collect(in_flight)
        return [o for o in outputs if o is not None]

    def _launch(self) -> list[EngineCoreOutput | None]:
        """Schedule the next batch and queue it on the device; returns the outputs of requests that failed."""
        outputs = self._admit_compiled()
        batch = self.scheduler.schedule()
        outputs += [self._fail(seq.request_id, seq.error or "the request cannot be scheduled", bad_request=True)
                    for seq in batch.failed]
        allowed = None
        if batch.seqs:
            self.counters["max_running_seqs"] = max(self.counters["max_running_seqs"], len(batch.seqs))
            self.counters["max_batch_tokens"] = max(self.counters["max_batch_tokens"], sum(batch.num_query_tokens))
            allowed, failed = self._grammar_masks(batch)
            if failed:  # their blocks are freed: take them out of this step
                outputs += [self._fail(rid, msg, bad_request=True) for rid, msg in failed]
                batch = self._only_live(batch)
                # Blocks they registered for prefix reuse when scheduled will never be computed now.
                self.block_manager.reset_prefix_cache()
                if batch.seqs:
                    allowed, _ = self._grammar_masks(batch)  # the rows of the requests that failed are gone
        if not batch.seqs:
            self.runner.release(batch.released)
            if self._awaiting_grammar and self._in_flight is None:  # only compiles to wait for: do not spin
                wait(list(self._awaiting_grammar.values()), timeout=0.01, return_when=FIRST_COMPLETED)
            return outputs
        if self.speculator is not None:
            self.speculator.plan(batch)  # proposals for the decoding sequences that may speculate
        try:
            launched = self.runner.launch(batch, allowed)
        except Exception as exc:  # e.g. out of memory on a huge prefill: fail this batch, keep serving
            return outputs + self._fail_batch(batch, exc)
        self.scheduler.advance(batch)
        self._in_flight = (batch, launched)
        return outputs

    def _collect(self, in_flight) -> list[EngineCoreOutput | None]:
        """Wait for a launched step, resolve its placeholders and decide the token-level finishes."""
        batch, launched = in_flight
        try:
            tokens, logprobs = self.runner.collect(launched)
        except Exception as exc:  # an error the device reports at the sync
            return self._fail_batch(batch, exc)
        if batch.draft_token_ids is not None:  # several tokens per sequence
            return self.speculator.collect(self, batch, tokens)
        self.scheduler.resolve(batch, tokens)
        outputs = []
        requests, finished = self.requests, SequenceStatus.FINISHED
        for seq, token, top in zip(batch.seqs, tokens, logprobs):
            if token is None or seq.status is finished:  # mid-prompt, or finished since launch: token dropped
                continue
            req = requests.get(seq.request_id)
            if req is None:
                continue
            try:
                outputs.append(req.output(seq, token, self._account(req, seq, token), top))
            except Exception as exc:  # one request's fault fails that request only
                logger.exception("request %s failed", seq.request_id)
                outputs.append(self._fail(seq.request_id, f"{type(exc).__name__}: {exc}"))
                continue
            if req.finished:
                del requests[seq.request_id]
        return outputs

    def _fail_batch(self, batch, exc: Exception) -> list[EngineCoreOutput | None]:
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

    def _account(self, req: Request, seq: Sequence, token: int) -> str | None:
        """Check one sampled (already appended) token; the finish reason its id alone decides (end of sequence,
        stop token ids, lengths, a completed grammar). A finished sequence leaves the scheduler now, before the
        next launch."""
        if token < 0:
            raise FloatingPointError("the model produced non-finite logits (NaN/inf) for this request")
        finish = seq.check_token_stop(self.eos_token_set, self.max_seq_len)
        if req.matchers:
            matcher = req.matchers[seq.index]
            if not matcher.accept(token):
                raise ValueError(f"token {token} was rejected by the output grammar")
            if matcher.is_terminated() and finish is None:
                finish = "stop"
        if finish is not None:
            self.scheduler.finish(seq, finish)
        return finish

    def _fail(self, request_id: str, message: str, bad_request: bool = False) -> EngineCoreOutput | None:
        """Fail one request; ``bad_request``: its own input is the cause (its schema, its size), not the engine."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(request_id)
        self.counters["errors"] += 1
        return req.error(message, bad_request)

    # ---- tools (engine thread) ---------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        stats = dict(self.counters)
        stats.update(dataclasses.asdict(self.scheduler.stats))
        stats.update(self.speculator.stats if self.speculator is not None else {})
        stats["free_blocks"] = self.block_manager.num_free_blocks
        stats["total_blocks"] = self.runner.num_blocks
        stats["running_requests"] = len(self.requests)
        stats["awaiting_grammar"] = len(self._awaiting_grammar)  # guided requests whose grammar is compiling
        stats["pid"] = os.getpid()  # the process the core runs in
        if self.device.type == "cuda":
            stats["gpu_peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return stats

    def perplexity(self, token_ids: list[int]) -> float:
        from ..build.perplexity import perplexity

        return perplexity(self.runner.model, token_ids, kv_cache_dtype=self.config.kv_cache_dtype,
                          max_context=self.max_seq_len)

    def save(self, engine_dir: Path) -> Path:
        from ..build import save_engine

        return save_engine(self.runner.model, self.loaded.model_dir, Path(engine_dir))
