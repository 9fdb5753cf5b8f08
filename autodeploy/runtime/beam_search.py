"""Beam search bookkeeping for one request, reproducing HF ``generate(num_beams=k, do_sample=False)``.

The engine owns the sequences and their KV caches; this class only decides, from each
step's log-probabilities, which (parent beam, token) pairs live on, and keeps the best
finished hypotheses. After :meth:`BeamSearchState.step` the engine rebuilds its live
sequences from the returned pairs (a child copies or shares its parent's KV pages and
appends its token), in the returned order, and feeds their next log-probs to ``step``.

The scoring mirrors transformers 5.x ``GenerationMixin._beam_search`` for one batch
item, op for op in fp32 so ties and rounding resolve identically:

* candidates: top ``max(2, 1 + n_eos) * k`` of ``running_score + logprob`` over all
  beams x vocab (so at least ``k`` non-EOS candidates survive);
* a candidate "finishes" when its token is an EOS id or it reaches ``max_new_tokens``;
* only finished candidates ranked in the first ``k`` may enter the finished pool, with
  score ``sum_logprobs / generated_len ** length_penalty``; the pool keeps the best k;
* the next running beams are the best k candidates, finished ones pushed down by -1e9
  (so, like HF, a step can continue with -1e9-scored "dead" beams);
* HF's early-stop heuristic (``early_stopping`` False / True / "never").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BeamSearchState"]

_NEG = -1.0e9


class BeamSearchState:
    """Beam search over one request; call :meth:`step` until :attr:`is_done`."""

    def __init__(
        self,
        num_beams: int,
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
    ):
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        if early_stopping not in (True, False, "never"):
            raise ValueError("early_stopping must be True, False or 'never'")
        self.num_beams = int(num_beams)
        self.max_new_tokens = int(max_new_tokens)
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids})
        self.length_penalty = float(length_penalty)
        self.early_stopping = early_stopping
        k = self.num_beams
        self._beams_to_keep = max(2, 1 + len(self.eos_token_ids)) * k
        self._top_num_beam_mask = torch.cat(
            (torch.ones(k, dtype=torch.bool), torch.zeros(self._beams_to_keep - k, dtype=torch.bool))
        )
        # Running beams: generated tokens and accumulated log-prob. Before the first step
        # there is one live sequence (the prompt); HF models that as k identical beams with
        # scores [0, -1e9, ...], which we reproduce inside step().
        self._running: list[list[int]] = [[]]
        self._running_scores = torch.zeros(1, dtype=torch.float32)
        # Finished pool, always k slots sorted best first (empty slots score -1e9).
        self._finished: list[list[int]] = [[] for _ in range(k)]
        self._finished_scores = torch.full((k,), _NEG, dtype=torch.float32)
        self._is_finished = torch.zeros(k, dtype=torch.bool)
        self._improvement_possible = True
        self._gen_len = 0
        self._done = False

    @classmethod
    def from_config(cls, config, eos_token_ids: Sequence[int] = (), early_stopping: bool | str = False):
        """Build from a :class:`~autodeploy.runtime.sampling.SamplingConfig` (beam_width, max_new_tokens, ...)."""
        eos = [] if config.ignore_eos else list(eos_token_ids)
        return cls(
            num_beams=config.beam_width,
            max_new_tokens=config.max_new_tokens,
            eos_token_ids=eos + list(config.stop_token_ids),
            length_penalty=config.length_penalty,
            early_stopping=early_stopping,
        )

    @property
    def is_done(self) -> bool:
        return self._done

    @property
    def num_live_beams(self) -> int:
        """How many rows the next :meth:`step` expects (1 before the first step, 0 when done)."""
        return 0 if self._done else len(self._running)

    @property
    def live_beams(self) -> list[list[int]]:
        """Generated tokens of each live beam, in the order :meth:`step` expects rows."""
        return [list(b) for b in self._running] if not self._done else []

    def step(self, logprobs: torch.Tensor) -> list[tuple[int, int]]:
        """Advance one token given ``logprobs`` [num_live_beams, V] (log_softmax of fp32 logits), on any device:
        the vocabulary-wide top-k runs there, the bookkeeping on the host.

        Returns one ``(parent_beam_index, token)`` per new live beam (empty once done),
        where ``parent_beam_index`` indexes the rows just passed in. Apply any logits
        processors/penalties to ``logprobs`` before calling, as HF does.
        """
        if self._done:
            raise RuntimeError("beam search is already done")
        k = self.num_beams
        live = len(self._running)
        if logprobs.dim() != 2 or logprobs.shape[0] != live:
            raise ValueError(f"expected logprobs of shape [{live}, V], got {tuple(logprobs.shape)}")
        logprobs = logprobs.to(torch.float32)
        vocab = logprobs.shape[1]

        if self._gen_len == 0 and live == 1:
            # HF starts with k copies of the prompt, scores [0, -1e9, ...].
            logprobs = logprobs.expand(k, vocab)
            running_scores = torch.full((k,), _NEG, dtype=torch.float32)
            running_scores[0] = 0.0
            parent_rows = [0] * k
            running = [[] for _ in range(k)]
        else:
            running_scores = self._running_scores
            parent_rows = list(range(live))
            running = self._running

        # (c) top-K continuations over all beams x vocab (HF shapes: [batch=1, k * V]), where the log-probs
        # live: only the 2k candidates reach the host, in one copy (float64 holds both exactly).
        acc = (logprobs + running_scores.to(logprobs.device)[:, None]).reshape(1, -1)
        topk_scores, topk_idx = torch.topk(acc, k=self._beams_to_keep)
        cand = torch.stack((topk_scores[0].double(), topk_idx[0].double())).cpu()
        topk_scores, topk_idx = cand[0].float(), cand[1].long()
        cand_beam = (topk_idx // vocab).tolist()
        cand_tok = (topk_idx % vocab).tolist()

        # (d) which candidates hit a stop: EOS token or max length.
        at_max = self._gen_len + 1 >= self.max_new_tokens
        eos = set(self.eos_token_ids)
        hits = torch.tensor([at_max or t in eos for t in cand_tok], dtype=torch.bool)

        # (e) next running beams: best k candidates, finished ones pushed below the rest.
        running_cand = topk_scores + hits.to(torch.float32) * _NEG
        next_idx = torch.topk(running_cand.unsqueeze(0), k=k)[1][0].tolist()

        # (f) merge just-finished top-k candidates into the finished pool.
        just_finished = hits & self._top_num_beam_mask
        # (HF also blocks additions when the pool is full under early_stopping=True or no
        # improvement is possible; for a single request both already ended the search.)
        fin_scores = topk_scores / ((self._gen_len + 1) ** self.length_penalty)
        fin_scores = fin_scores + (~just_finished) * _NEG
        merged_scores = torch.cat((self._finished_scores, fin_scores)).unsqueeze(0)
        merged_tokens = self._finished + [running[b] + [t] for b, t in zip(cand_beam, cand_tok)]
        merged_is_fin = torch.cat((self._is_finished, just_finished))
        keep = torch.topk(merged_scores, k=k)[1][0]
        self._finished = [list(merged_tokens[i]) for i in keep.tolist()]
        self._finished_scores = merged_scores[0, keep]
        self._is_finished = merged_is_fin[keep]

        self._running = [running[cand_beam[i]] + [cand_tok[i]] for i in next_idx]
        self._running_scores = running_cand[next_idx]
        self._gen_len += 1

        # (g) HF's stopping heuristic for the whole beam search.
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_new_tokens
        else:
            best_len = self._gen_len
        best_running = self._running_scores[:1] / (best_len**self.length_penalty)
        worst_finished = torch.where(self._is_finished, self._finished_scores.min(), _NEG)
        self._improvement_possible = self._improvement_possible and bool((best_running > worst_finished).any())
        all_finished = bool(self._is_finished.all())
        self._done = (
            not self._improvement_possible
            or (all_finished and self.early_stopping is True)
            or bool(hits.all())
        )
        if self._done:
            return []
        return [(parent_rows[cand_beam[i]], cand_tok[i]) for i in next_idx]

    def finalize_with_scores(self, num_return_sequences: int = 1) -> list[tuple[list[int], float]]:
        """Best ``num_return_sequences`` hypotheses as (generated tokens, HF ``sequences_scores``).

        Tokens include the EOS that ended a hypothesis, as HF does. If called before
        :attr:`is_done` (e.g. the request was aborted) the live beams compete too, scored
        at their current length.
        """
        if not 1 <= num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences must be in [1, {self.num_beams}]")
        hyps = [(toks, float(s)) for toks, s, f in zip(self._finished, self._finished_scores, self._is_finished) if f]
        if not self._done and self._gen_len > 0:
            norm = self._gen_len**self.length_penalty
            hyps += [(list(t), float(s) / norm) for t, s in zip(self._running, self._running_scores) if s > _NEG / 2]
            hyps.sort(key=lambda h: h[1], reverse=True)
        return [(list(t), s) for t, s in hyps[:num_return_sequences]]

    def finalize(self, num_return_sequences: int = 1) -> list[list[int]]:
        """Generated tokens of the best ``num_return_sequences`` hypotheses, best first."""
        return [t for t, _ in self.finalize_with_scores(num_return_sequences)]
