"""The gate's perplexity is taken over the tokens training scores; KLD and top-1 over every position.

    lorax check adapter/ dist/model-q8_0.gguf      # report.md: "PPL over the N predicted tokens training's loss scores"
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_data import chat_records, prompt_completion_records, text_records

from exporter.gate import metrics
from exporter.gate.samples import build
from train import data

VOCAB = 50


def _logits(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(0, 2, size=(n, VOCAB)).astype(np.float32)


def _ppl(logits: np.ndarray, ids: list[int], rows: list[int]) -> float:
    """Perplexity of ids[r + 1] given logits[r] over `rows`, written out independently of metrics.py."""
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return float(np.exp(np.mean([lse[r] - x[r, ids[r + 1]] for r in rows])))


def test_ppl_ratio_counts_only_the_scored_tokens_and_kld_every_position():
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(0, VOCAB, 12)), list(rng.integers(0, VOCAB, 9))]
    scored = [[False] * 7 + [True] * 5, None]  # a chat sample (answer from id 7) and a plain-text one
    ref = [_logits(rng, len(i)) for i in ids]
    # the target moves only the logits that predict prompt tokens of the chat sample (rows 0..5): deep-tail noise
    prompt_noise = [r.copy() for r in ref]
    prompt_noise[0][:6] += rng.normal(0, 3, size=(6, VOCAB)).astype(np.float32)
    everywhere = metrics.compare(ref, prompt_noise, ids)
    answers = metrics.compare(ref, prompt_noise, ids, scored)
    assert everywhere.ppl_ratio > 1.2  # the same noise, counted over prompts, fails any q8_0 limit
    assert answers.ppl_ratio == pytest.approx(1.0, abs=1e-12)
    assert answers.ppl_positions == 5 + 8 and everywhere.ppl_positions == 11 + 8
    # KLD and top-1 keep every position: the prompt-side change is still measured there
    assert answers.kld_mean == everywhere.kld_mean > 0.1 and answers.top1 == everywhere.top1 < 1.0

    # a change at the answer positions moves the scored perplexity by what it is, computed by hand
    answer_fault = [r.copy() for r in ref]
    answer_fault[0][6:11, :] -= 4.0 * (np.arange(VOCAB) == np.array(ids[0][7:12])[:, None])
    got = metrics.compare(ref, answer_fault, ids, scored)
    rows0, rows1 = list(range(6, 11)), list(range(8))
    want_t = np.exp((np.log(_ppl(answer_fault[0], ids[0], rows0)) * 5 + np.log(_ppl(ref[1], ids[1], rows1)) * 8) / 13)
    want_r = np.exp((np.log(_ppl(ref[0], ids[0], rows0)) * 5 + np.log(_ppl(ref[1], ids[1], rows1)) * 8) / 13)
    assert got.ppl_ratio == pytest.approx(want_t / want_r, rel=1e-9) and got.ppl_ratio > 1.5


def test_a_mask_of_the_wrong_length_is_refused():
    rng = np.random.default_rng(1)
    ids = [list(rng.integers(0, VOCAB, 6))]
    ref = [_logits(rng, 6)]
    with pytest.raises(ValueError, match="scored mask has 5 entries but there are 6 ids"):
        metrics.compare(ref, ref, ids, [[True] * 5])


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_gate_samples_score_the_tokens_lorax_train_puts_loss_on(tok):
    multi = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
                          {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Blue, of course."}]}
    rows = [*chat_records(2), multi]
    samples = build(rows, tok)
    for row, s in zip(rows, samples, strict=True):
        enc = data.encode(row, "messages", tok, max_len=1024)
        assert s.ids == enc["input_ids"]  # chat: the gate feeds exactly the ids training saw
        assert s.scored == [lab != data.IGNORE for lab in enc["labels"]]
    # both assistant turns of the conversation, each with its end-of-turn marker, and nothing else
    s = samples[-1]
    scored_text = tok.decode([t for t, k in zip(s.ids, s.scored, strict=True) if k])
    assert scored_text == "Red.<|im_end|>\nBlue, of course.<|im_end|>\n"


def test_completions_are_scored_from_their_first_token_and_text_everywhere(tok):
    pc = prompt_completion_records(1)[0]
    s_pc, s_text = build([pc, text_records(1)[0]], tok)
    first = s_pc.scored.index(True)
    assert not any(s_pc.scored[:first]) and all(s_pc.scored[first:])
    assert tok.decode(s_pc.ids[first:]) == pc["completion"]
    assert s_text.scored is None  # plain text: training scores every token, so does the gate
    # a conversation without an assistant turn has nothing training would score: read as text
    (s_user,) = build([{"messages": [{"role": "user", "content": "Hello there."}]}], tok)
    assert s_user.scored is None


def test_truncation_keeps_the_mask_aligned_with_the_ids(tok):
    row = chat_records(1)[0]
    full = build([row], tok)[0]
    cut = build([row], tok, max_len=len(full.ids) - 2)[0]
    assert cut.scored == full.scored[: len(cut.ids)]
    # cut inside the prompt: no answer token left, so every predicted token counts
    assert build([row], tok, max_len=3)[0].scored is None
