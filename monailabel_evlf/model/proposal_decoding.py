"""Box numbers decoded as a choice among the region proposals the LLM was shown (Groma-style region referring).

The detection connector hands the LLM K proposals, each a region token and its four box numbers. Measured on the
demo model's held-out slices, the LLM's answer box is never better than the best proposal it saw, but a free
decoder copies the proposal's numbers imperfectly: x1 and y1 exact, then x2 / y2 one to three pixels off (64 of 152
answers of one build; on a 4-pixel lesion that alone drops the IoU under 0.5). Constraining each box to be one of
the proposals keeps the LLM's choice (which proposal, its label, how many boxes, or none) and writes the numbers
exactly. HF ``generate`` has no prefix-trie constraint over runtime values (``PrefixConstrainedLogitsProcessor``
takes a callback; this is that callback's logic as a processor, with the state read back from the text).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

# an open ``"bbox_2d": [`` list awaiting its next number: after the bracket or after a comma and a space, as
# prompts.grounding_target writes answers (json.dumps); any other layout is left unconstrained
_AWAITING_NUMBER = re.compile(r'"bbox_2d":\s*\[\s*((?:\d+\s*,\s+)*)$')


class ProposalBoxConstraint(LogitsProcessor):
    """Masks every token but the allowed numbers wherever an answer is in the middle of writing a box.

    ``proposals[i]`` are image ``i``'s proposals as ``(K, 4)`` box numbers; generated rows ``r`` belong to image
    ``r // rows_per_image`` (``num_return_sequences``). A box's next number may be any proposal's number in that
    slot among the proposals whose earlier numbers match those already written.
    """

    def __init__(
        self,
        tokenizer,
        number_token_ids: Sequence[int],
        proposals: torch.Tensor,
        prompt_length: int,
        rows_per_image: int = 1,
    ) -> None:
        self.tokenizer = tokenizer
        self.number_token_ids = list(number_token_ids)
        self.proposals = [[tuple(int(v) for v in box) for box in image] for image in proposals.tolist()]
        self.prompt_length = prompt_length
        self.rows_per_image = rows_per_image

    def allowed_numbers(self, image: int, written: Sequence[int]) -> set[int]:
        """The numbers that may come next after ``written`` (0-3 numbers) in a box on ``image``."""
        n = len(written)
        return {box[n] for box in self.proposals[image] if list(box[:n]) == list(written)}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row, self.prompt_length :], skip_special_tokens=False)
            match = _AWAITING_NUMBER.search(text)
            if match is None:
                continue
            written = [int(v) for v in re.findall(r"\d+", match.group(1))]
            if len(written) >= 4:
                continue
            allowed = self.allowed_numbers(row // self.rows_per_image, written)
            if not allowed:
                continue
            keep = torch.tensor([self.number_token_ids[v] for v in sorted(allowed)], device=scores.device)
            masked = torch.full_like(scores[row], float("-inf"))
            masked[keep] = scores[row, keep]
            scores[row] = masked
        return scores


__all__ = ["ProposalBoxConstraint"]
