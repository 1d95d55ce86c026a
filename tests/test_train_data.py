"""Training data: record forms, chat-template rendering as at inference, completion-only labels, errors."""

from __future__ import annotations

import json

import pytest
from tiny_data import chat_records, prompt_completion_records, text_records, write_jsonl

from train import data
from train.errors import TrainError


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_text(enc: dict, tok) -> str:
    """The text of the positions that carry a label (what the loss is taken on)."""
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != data.IGNORE])


def masked_prefix_len(enc: dict) -> int:
    """How many leading positions carry -100."""
    return next(i for i, lab in enumerate(enc["labels"]) if lab != data.IGNORE)


def test_chat_prompt_is_tokenized_as_at_inference_and_masked(tok):
    msgs = chat_records(1)[0]["messages"]
    enc = data.encode({"messages": msgs}, "messages", tok, max_len=512)
    # the ids a user sends at inference: the template's prompt with the generation header
    prompt = list(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True)["input_ids"])
    assert enc["input_ids"][: len(prompt)] == prompt
    assert enc["labels"][: len(prompt)] == [data.IGNORE] * len(prompt)
    # everything after the prompt is the answer plus the end-of-turn marker, all trained on
    assert enc["labels"][len(prompt):] == enc["input_ids"][len(prompt):]
    assert trained_text(enc, tok) == "The color is red.<|im_end|>\n"
    assert masked_prefix_len(enc) == len(prompt)


def test_multi_turn_trains_every_assistant_turn_only(tok):
    msgs = chat_records(8)[7]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    enc = data.encode({"messages": msgs}, "messages", tok, max_len=512)
    assert trained_text(enc, tok) == "The color is red.<|im_end|>\nNumber 4.<|im_end|>\n"
    # the second user turn sits between the two trained spans and is masked
    second_prompt = list(tok.apply_chat_template(msgs[:3], add_generation_prompt=True, tokenize=True)["input_ids"])
    first_answer_end = len(list(tok.apply_chat_template(msgs[:2], tokenize=True)["input_ids"]))
    assert enc["input_ids"][: len(second_prompt)] == second_prompt
    assert set(enc["labels"][first_answer_end: len(second_prompt)]) == {data.IGNORE}


def test_prompt_completion_masks_prompt_and_ends_with_eos(tok):
    row = prompt_completion_records(1)[0]
    enc = data.encode(row, "prompt_completion", tok, max_len=512)
    prompt_ids = tok(row["prompt"])["input_ids"]
    assert enc["input_ids"][: len(prompt_ids)] == prompt_ids
    assert masked_prefix_len(enc) == len(prompt_ids)
    assert enc["input_ids"][-1] == tok.eos_token_id and enc["labels"][-1] == tok.eos_token_id
    assert trained_text(enc, tok) == row["completion"] + tok.eos_token


def test_text_trains_every_token(tok):
    row = text_records(1)[0]
    enc = data.encode(row, "text", tok, max_len=512)
    assert enc["labels"] == enc["input_ids"]
    assert enc["input_ids"][-1] == tok.eos_token_id


def test_masking_check_detects_unmasked_prompt(tok):
    # the assertions above would catch a masker that trains on the prompt: show it on such an encoding
    enc = data.encode({"messages": chat_records(1)[0]["messages"]}, "messages", tok, max_len=512)
    broken = dict(enc, labels=list(enc["input_ids"]))
    assert masked_prefix_len(enc) > 0
    with pytest.raises(StopIteration):
        masked_prefix_len(dict(broken, labels=[data.IGNORE] * len(enc["labels"])))
    assert trained_text(broken, tok) != trained_text(enc, tok)
    assert masked_prefix_len(broken) == 0


def test_truncation_counted_and_unlearnable_examples_dropped(tmp_path, tok):
    records = data.load(write_jsonl(chat_records(8), tmp_path / "c.jsonl"))
    full = data.tokenize(records, tok, max_len=512)
    lengths = [len(ids) for ids in full.dataset["input_ids"]]
    prompt_len = len(tok.apply_chat_template(records.rows[0]["messages"][:1], add_generation_prompt=True,
                                             tokenize=True)["input_ids"])
    assert full.truncated == 0 and full.dropped == 0 and full.tokens == sum(lengths)
    cut = min(lengths) - 1  # every example is longer than this
    short = data.tokenize(records, tok, max_len=cut)
    assert short.truncated == 8 and short.dropped == 0
    assert max(len(ids) for ids in short.dataset["input_ids"]) == cut
    # at the prompt length nothing trainable is left: every example is dropped -> an error, not a silent no-op
    with pytest.raises(TrainError, match="no example has a trainable token within max_seq_len"):
        data.tokenize(records, tok, max_len=prompt_len)


@pytest.mark.parametrize(("lines", "where", "what"), [
    (['{"text": "ok"}', '{"text": "ok"}', '{"text": "broken"'], 3, "not valid JSON"),
    (['{"text": "ok"}', '{"txt": "x"}'], 2, "expected a JSON object with 'messages'"),
    (['{"text": "ok"}', '', '{"prompt": "a", "completion": "b"}'], 3, "earlier records are 'text'"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "no assistant message"),
    (['{"messages": [{"role": "bot", "content": "hi"}]}'], 1, r"messages\[0\] needs a role"),
    (['{"prompt": "a", "completion": ""}'], 1, "completion non-empty"),
    (['[1, 2]'], 1, "expected a JSON object"),
])
def test_malformed_record_names_file_and_line(tmp_path, lines, where, what):
    path = write_jsonl(lines, tmp_path / "bad.jsonl")
    with pytest.raises(TrainError, match=rf"^{path}:{where}: .*{what}"):
        data.load(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(TrainError, match="no training records found"):
        data.load(path)


def test_good_files_load_in_every_form(tmp_path):
    for rows, fmt in [(chat_records(5), "messages"), (prompt_completion_records(5), "prompt_completion"),
                      (text_records(5), "text")]:
        rec = data.load(write_jsonl(rows, tmp_path / f"{fmt}.jsonl"))
        assert rec.format == fmt and rec.rows == rows


def test_datasets_dir_on_disk(tmp_path):
    import datasets

    rows = chat_records(6)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    rec = data.load(tmp_path / "ds")
    assert rec.format == "messages" and rec.rows == rows
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(TrainError, match=r"splits \['test'\] but no 'train'"):
        data.load(tmp_path / "dd")
    (tmp_path / "notds").mkdir()
    with pytest.raises(TrainError, match="not a dataset saved with save_to_disk"):
        data.load(tmp_path / "notds")


def test_eval_split_is_seeded_disjoint_and_written_as_jsonl(tmp_path):
    rec = data.Records(chat_records(40), "messages", "x")
    tr, ev = data.split_eval(rec, 0.1, seed=0)
    tr2, ev2 = data.split_eval(rec, 0.1, seed=0)
    _, ev3 = data.split_eval(rec, 0.1, seed=1)
    assert len(ev.rows) == 4 and len(tr.rows) == 36
    assert ev.rows == ev2.rows and tr.rows == tr2.rows
    assert ev3.rows != ev.rows
    keys = [json.dumps(r, sort_keys=True) for r in rec.rows]
    assert sorted(keys) == sorted(json.dumps(r, sort_keys=True) for r in tr.rows + ev.rows)
    data.write_jsonl(ev, tmp_path / "eval.jsonl")
    assert data.load(tmp_path / "eval.jsonl").rows == ev.rows
    with pytest.raises(TrainError, match="cannot be split"):
        data.split_eval(data.Records(chat_records(1), "messages", "one.jsonl"), 0.1, seed=0)
    assert data.split_eval(rec, 0.0, seed=0) == (rec, None)
