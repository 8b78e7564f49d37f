import itertools
import json

import pytest
import torch

from phatgoose.data import (
    IGNORE_INDEX,
    DataFormatError,
    Example,
    batches,
    collate_for_training,
    continuation_ids,
    load_examples,
    load_jsonl,
    pack_sequences,
    prompt_ids,
    token_boundary,
)


def write_lines(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------ loading
def test_load_jsonl_reads_free_text_and_multiple_choice(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        json.dumps({"input": "Q: 2+2?\nA:", "target": "4"}),
        "",
        json.dumps({"input": "Sky?", "choices": ["blue", "green"], "answer": 0}),
    )
    assert load_jsonl(path) == [
        Example(prompt="Q: 2+2?\nA:", target="4"),
        Example(prompt="Sky?", choices=("blue", "green"), answer=0),
    ]


def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '{"input": "a", "target": "b"}', "   ", "{oops")
    with pytest.raises(DataFormatError, match=r"d.jsonl:3: not valid JSON") as error:
        load_jsonl(path)
    assert error.value.line == 3


def test_answer_out_of_range_names_line_field_and_range(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        '{"input": "a", "target": "b"}',
        '{"input": "q", "choices": ["x", "y", "z"], "answer": 3}',
    )
    with pytest.raises(DataFormatError, match=r"d.jsonl:2: field 'answer': .* 0..2, got 3"):
        load_jsonl(path)


def test_boolean_answer_is_not_an_index(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl", '{"input": "q", "choices": ["x", "y"], "answer": true}'
    )
    with pytest.raises(DataFormatError, match=r":1: field 'answer': expected an integer"):
        load_jsonl(path)


def test_repeated_choices_are_refused(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '{"input": "q", "choices": ["x", "x"], "answer": 0}')
    with pytest.raises(DataFormatError, match=r"field 'choices': choices must be distinct.*'x'"):
        load_jsonl(path)


def test_empty_choices_list_is_refused(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '{"input": "q", "choices": [], "answer": 0}')
    with pytest.raises(DataFormatError, match=r"field 'choices': expected a non-empty list"):
        load_jsonl(path)


def test_missing_target_is_reported_as_missing(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '{"input": "q"}')
    with pytest.raises(DataFormatError, match=r":1: field 'target': .*missing"):
        load_jsonl(path)


def test_non_string_input_names_the_input_field(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '{"input": 5, "target": "x"}')
    with pytest.raises(DataFormatError, match=r"field 'input': expected a string, got int 5"):
        load_jsonl(path)


def test_misspelt_field_is_refused_as_unknown(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '{"input": "q", "target": "x", "traget": "y"}')
    with pytest.raises(DataFormatError, match=r"field 'traget': unknown field"):
        load_jsonl(path)


def test_mixing_target_and_choices_is_refused(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl", '{"input": "q", "target": "x", "choices": ["x"], "answer": 0}'
    )
    with pytest.raises(DataFormatError, match=r"unknown field\(s\) \['target'\]"):
        load_jsonl(path)


def test_line_that_is_not_an_object_is_refused(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '["input", "target"]')
    with pytest.raises(DataFormatError, match=r":1: expected a JSON object, got list"):
        load_jsonl(path)


def test_file_without_examples_is_refused(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", "", "")
    with pytest.raises(DataFormatError, match="no examples"):
        load_jsonl(path)


def test_load_examples_dispatches_jsonl(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", '{"input": "q", "target": "x"}')
    assert load_examples(path) == [Example(prompt="q", target="x")]


def test_load_examples_refuses_unknown_extensions(tmp_path):
    with pytest.raises(DataFormatError, match=r"d.csv: unknown data format"):
        load_examples(tmp_path / "d.csv")


def test_load_examples_reads_every_example_of_a_bigbench_task(tmp_path):
    task = {
        "name": "t",
        "examples": [
            {"input": f"q{i}", "target_scores": {"yes": int(i % 2), "no": 1 - int(i % 2)}}
            for i in range(4)
        ],
    }
    (tmp_path / "task.json").write_text(json.dumps(task))
    examples = load_examples(tmp_path / "task.json")
    assert len(examples) == 4
    assert sorted(ex.target_text for ex in examples) == ["no", "no", "yes", "yes"]


# --------------------------------------------------------------------------- tokenising
def test_continuation_is_tokenised_apart_from_prompt_with_eos(tokenizer):
    assert prompt_ids(tokenizer, "Q:") == ids(tokenizer, "Q:")
    with_eos = continuation_ids(tokenizer, "Q:", "ab", add_eos=True)
    assert with_eos == [*ids(tokenizer, " ab"), tokenizer.eos_token_id]
    assert continuation_ids(tokenizer, "Q: ", "ab", add_eos=False) == ids(tokenizer, " ab")


def test_an_empty_prompt_is_the_eos_token(tokenizer):
    assert prompt_ids(tokenizer, "") == [tokenizer.eos_token_id]


def test_trailing_spaces_of_the_prompt_are_tokenised_with_the_continuation(tokenizer):
    # The joined text is unchanged; only the token boundary moves before the spaces.
    assert token_boundary("\nA: ", "yes") == ("\nA:", " yes")
    assert token_boundary("\nA:\n", "yes") == ("\nA:\n", "yes")
    assert token_boundary("A:", "yes") == ("A:", " yes")
    assert prompt_ids(tokenizer, "Q:  ") == ids(tokenizer, "Q:")
    assert continuation_ids(tokenizer, "Q:  ", "ab", add_eos=False) == ids(tokenizer, "  ab")


def test_causal_batch_labels_only_the_target_and_eos(tokenizer):
    batch = collate_for_training(
        tokenizer,
        [Example(prompt="Q:", target="ab"), Example(prompt="Long Q:", target="c")],
        max_length=32,
        is_encoder_decoder=False,
    )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    first = ids(tokenizer, "Q:") + ids(tokenizer, " ab") + [eos]
    second = ids(tokenizer, "Long Q:") + ids(tokenizer, " c") + [eos]
    assert batch["input_ids"].tolist() == [first + [pad] * 4, second]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0] * 4, [1] * 10]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 2 + first[2:] + [IGNORE_INDEX] * 4,
        [IGNORE_INDEX] * 7 + second[7:],
    ]


def test_packing_puts_short_sequences_together_in_rows_of_the_longest_width():
    pad = 0
    batch = {  # lengths 2, 5, 3: rows {5}, {3, 2}
        "input_ids": torch.tensor([[1, 2, pad, pad, pad], [3, 4, 5, 6, 7], [8, 9, 10, pad, pad]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor(
            [[-100, 2, -100, -100, -100], [-100, -100, 5, 6, 7], [-100, 9, 10, -100, -100]]
        ),
    }
    packed = pack_sequences(batch)
    assert set(packed) == {"input_ids", "position_ids", "labels"}  # no attention mask
    assert packed["input_ids"].tolist() == [[3, 4, 5, 6, 7], [8, 9, 10, 1, 2]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, -100, 5, 6, 7], [-100, 9, 10, -100, 2]]


def test_a_packed_row_ends_in_a_segment_of_its_own_and_never_targets_a_first_token():
    batch = {  # lengths 4, 1, 2: rows {4}, {2, 1} with one free slot
        "input_ids": torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0], [6, 7, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[1, 2, 3, 4], [5, -100, -100, -100], [6, 7, -100, -100]]),
    }
    packed = pack_sequences(batch)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 5, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert packed["labels"].tolist() == [[-100, 2, 3, 4], [-100, 7, -100, -100]]


def test_a_batch_whose_sequences_do_not_share_rows_stays_padded(tokenizer):
    examples = [Example(prompt="Q:", target="ab"), Example(prompt="Long Q:", target="c")]
    batch = collate_for_training(tokenizer, examples, max_length=32, is_encoder_decoder=False)
    assert pack_sequences(batch) is batch


def test_causal_truncation_drops_prompt_from_the_left(tokenizer):
    batch = collate_for_training(
        tokenizer, [Example(prompt="abcdef", target="xy")], max_length=6, is_encoder_decoder=False
    )
    expected = ids(tokenizer, "ef") + ids(tokenizer, " xy") + [tokenizer.eos_token_id]
    assert batch["input_ids"].tolist() == [expected]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 2 + expected[2:]]


def test_overlong_target_keeps_one_prompt_token(tokenizer):
    batch = collate_for_training(
        tokenizer, [Example(prompt="ab", target="xyz")], max_length=3, is_encoder_decoder=False
    )
    assert batch["input_ids"].tolist() == [ids(tokenizer, "b") + ids(tokenizer, " x")]
    assert batch["labels"][0, 0].item() == IGNORE_INDEX


def test_encoder_decoder_batch_puts_target_in_labels(tokenizer):
    batch = collate_for_training(
        tokenizer,
        [Example(prompt="Q:", target="ab"), Example(prompt="Q: x", choices=("n", "y"), answer=1)],
        max_length=32,
        is_encoder_decoder=True,
    )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [ids(tokenizer, "Q:") + [pad] * 2, ids(tokenizer, "Q: x")]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [*ids(tokenizer, " ab"), eos],
        [*ids(tokenizer, " y"), eos, IGNORE_INDEX],
    ]


def test_batches_are_full_seeded_and_cover_each_epoch():
    examples = [Example(prompt=str(i), target="t") for i in range(5)]
    first = list(itertools.islice(batches(examples, 2, seed=3), 5))
    again = list(itertools.islice(batches(examples, 2, seed=3), 5))
    other = list(itertools.islice(batches(examples, 2, seed=4), 5))
    assert first == again and first != other
    assert all(len(b) == 2 for b in first)
    flat = [ex.prompt for b in first for ex in b]
    assert sorted(flat[:5]) == sorted(flat[5:]) == ["0", "1", "2", "3", "4"]
    assert flat[:5] != flat[5:]  # reshuffled between epochs


def test_batches_refuse_an_empty_dataset():
    with pytest.raises(ValueError, match="at least one example"):
        next(batches([], 2, seed=0))


def test_collate_returns_long_tensors(tokenizer):
    batch = collate_for_training(
        tokenizer, [Example(prompt="a", target="b")], max_length=8, is_encoder_decoder=False
    )
    assert {v.dtype for v in batch.values()} == {torch.long}
