"""Prompt-lookup (n-gram) speculative decoding in the engine: which decoding sequences verify a proposal in a
step, and what the verify step's accepted run does to them. Torch-free, like the scheduler.

``plan`` runs on a scheduled batch before launch. A decoding sequence whose tokens are all on the host gets a
proposal from ``NgramProposer`` (its prompt + output so far); its query grows from its last token to that token
plus the k proposed ones, and the block manager reserves KV slots for them. The model runner's verify step
(``verify_step``) samples every position exactly as plain decoding would and keeps the longest agreeing prefix,
plus one token of its own; ``collect`` appends that run token by token (end of sequence, stop token ids,
max_tokens and grammars end it at the right token), takes back the KV of the rejected tokens (the sequence's
computed length advances by the accepted count only) and emits one output with several token ids.

When it is off for a step, the step is plain decoding:
- a step of more than ``speculative_disable_by_batch_size`` sequences (big batches are compute-bound: verifying
  costs throughput there), or one holding a request that asked for logprobs (one logprob per emitted token is not
  wired through the verify step);
- per sequence: guided (grammar) requests, sequences below min_tokens (their end-of-sequence ban holds for one
  position only), prefill chunks, and a sequence whose newest token is still on the device.
Asynchronous scheduling: proposing needs the newest token on the host, so a step small enough to speculate is
collected before the next one is scheduled (``needs_host_tokens``); bigger steps keep the asynchronous overlap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .ngram_proposer import NgramProposer
from .sequence import SequenceStatus

if TYPE_CHECKING:
    from ..config import EngineConfig
    from .block_manager import BlockManager
    from .scheduler import ScheduledBatch
    from .sequence import Sequence


class Speculator:
    def __init__(self, config: "EngineConfig", block_manager: "BlockManager"):
        self.proposer = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_max,
                                      config.prompt_lookup_min)
        self.disable_by_batch_size = config.speculative_disable_by_batch_size
        self.max_num_tokens = config.max_num_tokens
        self.block_manager = block_manager
        self.stats = {"spec_verify_steps": 0,  # steps that verified at least one proposal
                      "spec_proposals": 0,  # sequence-steps with a proposal
                      "spec_proposed_tokens": 0, "spec_accepted_tokens": 0}

    # ---- before launch ---------------------------------------------------------------------------------------
    def plan(self, batch: "ScheduledBatch") -> None:
        """Give the batch's eligible decoding sequences a proposal (see the module docstring)."""
        seqs = batch.seqs
        if not seqs or len(seqs) > self.disable_by_batch_size:
            return
        batch.needs_host_tokens = True  # the next schedule proposes from this step's tokens
        if any(seq.params.logprobs is not None for seq in seqs):
            return
        budget = self.max_num_tokens - batch.num_tokens
        drafts: list[list[int]] = []
        for i, seq in enumerate(seqs):
            draft: list[int] = []
            if budget > 0 and batch.samples[i] and batch.num_query_tokens[i] == 1 and self._may_speculate(seq):
                draft = self._propose(seq, budget)
                batch.num_query_tokens[i] += len(draft)
                budget -= len(draft)
            drafts.append(draft)
        if any(drafts):
            batch.draft_token_ids = drafts
            self.stats["spec_verify_steps"] += 1

    @staticmethod
    def _may_speculate(seq: "Sequence") -> bool:
        params = seq.params
        return (not seq.num_placeholders and params.guided_json is None
                and seq.num_output_tokens >= params.min_tokens)

    def _propose(self, seq: "Sequence", budget: int) -> list[int]:
        """seq's proposal, capped so its run (proposal + 1) fits max_tokens / max_seq_len and the step's token
        budget, with KV slots reserved; [] when there is none or the blocks are short."""
        room = min(budget, seq.max_num_tokens - len(seq.token_ids) - 1)
        if room <= 0:
            return []
        proposal = self.proposer.propose(seq.token_ids, room)
        if not len(proposal) or not self.block_manager.try_append(seq, 1 + len(proposal)):
            return []
        self.stats["spec_proposals"] += 1
        self.stats["spec_proposed_tokens"] += len(proposal)
        return proposal.tolist()

    # ---- after the step --------------------------------------------------------------------------------------
    def collect(self, core, batch: "ScheduledBatch", runs: list[list[int] | None]) -> list:
        """The outputs of a verify step: runs[i] is sequence i's emitted tokens (its accepted proposal, then the
        verify step's own token), None where it did not sample. ``core`` is the EngineCore (its requests and
        per-token accounting)."""
        outputs = []
        requests, finished = core.requests, SequenceStatus.FINISHED
        for seq, run, draft in zip(batch.seqs, runs, batch.draft_token_ids):
            if run is None or seq.status is finished:  # mid-prompt, or finished since launch: dropped
                continue
            req = requests.get(seq.request_id)
            if req is None:
                continue
            self._roll_back(core, seq, len(draft), len(run) - 1)
            try:
                tokens, finish = [], None
                for token in run:
                    if tokens:
                        seq.append_token(token)
                    else:
                        seq.resolve_placeholder(token)
                    tokens.append(token)
                    finish = core._account(req, seq, token)
                    if finish is not None:  # the rest of the run is dropped
                        break
                outputs.append(req.output_run(seq, tokens, finish))
            except Exception as exc:  # one request's fault fails that request only
                outputs.append(core._fail(seq.request_id, f"{type(exc).__name__}: {exc}"))
                continue
            if req.finished:
                del requests[seq.request_id]
        return outputs

    def _roll_back(self, core, seq: "Sequence", num_proposed: int, num_accepted: int) -> None:
        """The step computed KV for the whole proposal; only the accepted part counts. The blocks that held only
        rejected tokens go back to the pool (and the sequence's persistent row forgets them)."""
        self.stats["spec_accepted_tokens"] += num_accepted
        seq.num_computed_tokens -= num_proposed - num_accepted
        before = len(seq.block_table)
        self.block_manager.truncate(seq, seq.num_computed_tokens + 1)  # + 1: the new last token, next step's
        if len(seq.block_table) < before:
            core.runner.input_batch.truncated(seq)
