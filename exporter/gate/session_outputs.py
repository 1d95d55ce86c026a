"""A runner's teacher-forced logits and greedy generations from one KV cache per batch (formats.hf.session):
the prompt of every sample is computed once, not again as a prefill for decoding.

    logits, gens, how = session_outputs(runner, samples, budgets, vocab, candidates)

Used by evaluate.run_outputs for runners whose can_session() says yes (HF models, the reference included,
and GGUF files in llama.cpp: formats.gguf.batch.Session). The steps
are those of evaluate.batched_generations / verified_generations, from inside the cache: after the
teacher-forced pass each row is rewound to its prompt, and the logits at the prompt's last position are
the first greedy step. With `candidates`, they are fed after the prompt in one step and checked (the
runner's own argmax after every prefix); a row that disagrees is rewound to the agreeing prefix and decodes
on from its own token. Without, every row decodes from the prompt.
"""

from __future__ import annotations

import numpy as np

from exporter.gate.evaluate import accept, unfinished
from formats.runner import batch_budget, greedy_batch, plan_batches


def session_outputs(runner, samples, budgets: list[int], vocab: int, candidates=None, bar=None):
    """(logits per sample, generations per sample, {"rows", "verified", "continued"} or None)."""
    logits: list = [None] * len(samples)
    gens: list = [None] * len(samples)
    held = 0
    widest = max(budgets, default=0) + max((len(c) for c in candidates or []), default=0)
    for group in plan_batches([len(s.ids) + widest for s in samples], vocab, batch_budget()):
        sess = runner.cache_session(len(group), max(len(samples[i].ids) for i in group) + widest)
        try:
            held += _group(sess, group, samples, budgets, candidates, runner.stop, logits, gens)
        finally:
            sess.close()
        if bar is not None:
            bar.update(2 * len(group))
    how = None if candidates is None else {"rows": len(samples), "verified": held, "continued": len(samples) - held}
    return logits, gens, how


def _group(sess, group, samples, budgets, candidates, stop, logits, gens) -> int:
    """One batch's teacher-forced pass, then its generations from inside the cache. Returns the rows whose
    candidate held (0 without candidates)."""
    for i, lg in zip(group, sess.feed([samples[i].ids for i in group]), strict=True):
        logits[i] = lg
    prompts = [len(samples[i].prompt_ids) for i in group]
    for r, n in enumerate(prompts):
        sess.keep(r, n)
    first = [logits[i][n - 1] for i, n in zip(group, prompts, strict=True)]
    if candidates is not None:
        return _verify(sess, group, first, candidates, budgets, stop, gens)
    for i, g in zip(group, _decode(sess, list(range(len(group))), None, first, [budgets[i] for i in group], stop),
                    strict=True):
        gens[i] = g
    return 0


def _verify(sess, group, first, candidates, budgets, stop, gens) -> int:
    """Check each row's candidate after its prompt; decode on where it disagrees. Returns the rows that held."""
    cands = [list(candidates[i])[:budgets[i]] for i in group]
    fed = sess.feed(cands)
    todo, last, remaining = [], [], []
    for r, i in enumerate(group):
        c = cands[r]
        choice = [int(np.argmax(first[r]))] + (fed[r].argmax(-1).tolist() if c else [])  # the runner's own
        gen, j = accept(choice, c, budgets[i], stop)
        gens[i] = gen
        sess.keep(r, len(sess.live[r]) - len(c) + j)  # the prompt and the agreeing part of the candidate
        if unfinished(gen, budgets[i], stop):
            todo.append(r)
            last.append(gen[-1])
            remaining.append(budgets[i] - len(gen))
    if todo:
        for r, rest in zip(todo, _decode(sess, todo, last, None, remaining, stop), strict=True):
            gens[group[r]] = gens[group[r]] + rest
    return len(group) - len(todo)


def _decode(sess, rows: list[int], last: list[int] | None, first, budgets: list[int], stop) -> list[list[int]]:
    """Greedy tokens for `rows` of the session: from `first` (the logits of each row's next token), or after
    feeding each row's `last` token (its latest, not yet in the cache); each cut to its budget."""

    def step(toks):
        if toks is None and first is not None:
            return np.stack(first)
        feed: list[list[int]] = [[] for _ in range(sess.rows)]
        for k, r in enumerate(rows):
            feed[r] = [int((last if toks is None else toks)[k])]
        out = sess.feed(feed)
        return np.stack([out[r][-1] for r in rows])

    out = greedy_batch(step, max(budgets, default=0), len(rows), stop)
    return [g[:b] for g, b in zip(out, budgets, strict=True)]
