"""One request in the engine: its sequence, and the detokenizer that turns its tokens into text deltas."""
from __future__ import annotations

from dataclasses import dataclass

from rempd.engine.detokenizer import IncrementalDetokenizer
from rempd.engine.outputs import RequestOutput
from rempd.engine.scheduler import Scheduler
from rempd.engine.sequence import Sequence


@dataclass
class Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer

    def output(self, scheduler: Scheduler) -> RequestOutput:
        """The newest token as an output. A stop string ends the sequence here, since only the detokenized text
        shows one; a sequence that ended otherwise flushes the text the detokenizer still held back."""
        seq = self.seq
        token = seq.token_ids[-1]
        text = self.detokenizer.add([token])
        if self.detokenizer.stopped:
            scheduler.finish(seq, "stop")
        elif seq.is_finished:
            text += self.detokenizer.flush()
        return RequestOutput(seq.request_id, [token], text, seq.is_finished, seq.finish_reason,
                             seq.num_prompt_tokens, seq.num_output_tokens)

    def fail(self, scheduler: Scheduler, message: str) -> RequestOutput:
        """End the request with an error; whatever it had in flight is forgotten with the failed step."""
        seq = self.seq
        seq.in_flight = seq.num_pending = 0
        scheduler.finish(seq, "error")
        return RequestOutput(seq.request_id, [], "", True, "error", seq.num_prompt_tokens, seq.num_output_tokens,
                             error=message)
