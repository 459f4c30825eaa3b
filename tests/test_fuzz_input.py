"""Bad input, property-based: every malformed dataset or flag gives one clean line naming where and what (exit 2),
or a correct, counted skip; never a traceback, never a silently wrong example."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ForkedCli, write_jsonl
from lamelm_fast.train import ConfigError, TrainConfig
from lamelm_fast.train.cli import parse_config
from lamelm_fast.train.config import validate
from lamelm_fast.train.data import CHAT_ROLES, SHAREGPT_ROLES, prepare_datasets

MAX_SEQ_LENGTH = 64
# database=None: nothing written into the checkout; the examples stay few enough for 2 CPU cores.
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Text with everything JSON can carry, lone surrogates ("\ud800") included.
text = st.text(st.characters(exclude_categories=()), max_size=30)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text)
anything = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                        max_leaves=6)
field_value = st.one_of(text, text, anything)  # mostly strings, sometimes the wrong type
alpaca = st.fixed_dictionaries({}, optional={"instruction": field_value, "input": field_value,
                                             "output": field_value, "note": anything})
well_formed_alpaca = st.fixed_dictionaries({"instruction": text, "output": text}, optional={"input": text})
message = st.one_of(st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from([*CHAT_ROLES, "bot", "", "User"]), anything), "content": field_value}),
    anything)
chat = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=4), anything)})
sharegpt_turn = st.one_of(st.fixed_dictionaries({}, optional={
    "from": st.one_of(st.sampled_from([*SHAREGPT_ROLES, "GPT", "narrator", ""]), anything), "value": field_value,
    "weight": st.one_of(st.none(), st.sampled_from([0, 1, 0.5]))}), message)
sharegpt = st.fixed_dictionaries({"conversations": st.one_of(st.lists(sharegpt_turn, max_size=4), anything)})
prompt_completion = st.fixed_dictionaries({}, optional={"prompt": st.one_of(field_value, st.lists(message, max_size=3)),
                                                        "completion": st.one_of(field_value,
                                                                                st.lists(message, max_size=3))})
plain = st.fixed_dictionaries({}, optional={"text": field_value})


def jsonl_line(record: Any, ascii_only: bool) -> bytes:
    # Not ASCII-escaped, a lone surrogate becomes bytes that are not UTF-8: the invalid-UTF-8 case.
    return json.dumps(record, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


lines = st.lists(st.one_of(
    st.builds(jsonl_line, st.one_of(alpaca, chat, sharegpt, prompt_completion, plain, anything), st.booleans()),
    st.binary(max_size=20).map(lambda data: data.replace(b"\n", b"")),  # not JSON, often not UTF-8
    st.just(b""),  # blank lines are skipped
), min_size=1, max_size=6)

def blank(index: int, line: bytes) -> bool:
    """A line the reader skips: only whitespace once decoded (a byte-order mark may open the file)."""
    return not line.decode("utf-8-sig" if index == 0 else "utf-8", "replace").strip()


RECORD_PROBLEMS = ("field '", "messages[", "conversations[", "prompt[", "completion[", "not valid UTF-8",
                   "not valid JSON", "expected a JSON object", "cannot tell the dataset format", "nested too deeply",
                   "refused this conversation", "does not render")


def check_outcome(path: Path, raw_lines: list[bytes], fmt: str, tokenizer: Any) -> None:
    """The one property: a one-line ConfigError naming the file (and line and field), or consistent examples."""
    try:
        train_set, eval_set, stats = prepare_datasets(str(path), "train", fmt, tokenizer, MAX_SEQ_LENGTH, False,
                                                      0.0, 0)
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, message
        where = re.search(rf"{re.escape(str(path))}:(\d+)", message)
        if "has no records" in message or "every label" in message:
            return
        assert any(problem in message for problem in RECORD_PROBLEMS), message
        assert where is not None, message
        line = int(where.group(1)) - 1
        assert line < len(raw_lines) and not blank(line, raw_lines[line]), message  # a real, non-blank line
        return
    records = [line for index, line in enumerate(raw_lines) if not blank(index, line)]
    assert stats.records == len(records)
    assert len(train_set) + len(eval_set) + stats.skipped_no_targets == stats.records
    for example in train_set:
        assert len(example.input_ids) == len(example.target_mask) <= MAX_SEQ_LENGTH
        assert example.num_targets > 0 and all(0 <= t < len(tokenizer) for t in example.input_ids)
    if stats.format in ("alpaca", "prompt_completion") and stats.truncated == 0 and stats.skipped_no_targets == 0:
        # Nothing skipped or cut: example i is record i, and its targets are exactly the output (the completion, a
        # string) and one eos.
        for raw, example in zip(records, train_set, strict=True):
            output = json.loads(raw)["output" if stats.format == "alpaca" else "completion"]
            if not isinstance(output, str):
                continue  # a conversation
            expected = tokenizer(output, add_special_tokens=False)["input_ids"]
            expected += [tokenizer.eos_token_id] if expected[-1:] != [tokenizer.eos_token_id] else []
            targets = [t for t, is_target in zip(example.input_ids, example.target_mask, strict=True) if is_target]
            assert targets == expected


@FUZZ
@given(raw_lines=lines, fmt=st.sampled_from(["auto", "alpaca", "chat", "prompt_completion", "text"]))
def test_malformed_jsonl_is_a_clean_error_or_a_correct_dataset(tmp_path: Path, embedded_tokenizer: Any,
                                                               raw_lines: list[bytes], fmt: str) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(raw_lines) + b"\n")
    check_outcome(path, raw_lines, fmt, embedded_tokenizer)


@FUZZ
@given(records=st.lists(st.one_of(alpaca, well_formed_alpaca), min_size=1, max_size=6))
def test_valid_json_alpaca_records_of_any_shape(tmp_path: Path, embedded_tokenizer: Any,
                                                records: list[dict]) -> None:
    """Well-formed JSON throughout, so the checks reach the fields: wrong types, missing, empty, surrogates."""
    raw_lines = [jsonl_line(record, ascii_only=True) for record in records]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(raw_lines) + b"\n")
    check_outcome(path, raw_lines, "alpaca", embedded_tokenizer)


@FUZZ
@given(conversations=st.lists(st.lists(st.fixed_dictionaries({
    "role": st.sampled_from([*CHAT_ROLES, "bot", "", "User"]), "content": text},
    optional={"weight": st.sampled_from([0, 1, None]), "name": text}), min_size=1, max_size=4),  # unrendered extras
    min_size=1, max_size=4))
def test_chat_records_with_unknown_roles_and_odd_content(tmp_path: Path, embedded_tokenizer: Any,
                                                         conversations: list[list[dict]]) -> None:
    raw_lines = [jsonl_line({"messages": messages}, ascii_only=True) for messages in conversations]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(raw_lines) + b"\n")
    check_outcome(path, raw_lines, "chat", embedded_tokenizer)


@FUZZ
@given(conversation=st.lists(st.fixed_dictionaries({"from": st.sampled_from([*SHAREGPT_ROLES, "GPT", "Human"]),
                                                    "value": text}, optional={"weight": st.sampled_from([0, 1])}),
                             min_size=1, max_size=4))
def test_a_sharegpt_record_is_the_messages_record_with_chat_roles(tmp_path: Path, embedded_tokenizer: Any,
                                                                  conversation: list[dict]) -> None:
    """The same examples, or the same error about the same turn; a weight (0: context) means the same in both, as in
    OpenAI's fine-tuning format."""
    messages = [{"role": SHAREGPT_ROLES[turn["from"].lower()], "content": turn["value"],
                 **{key: value for key, value in turn.items() if key == "weight"}} for turn in conversation]
    outcomes = []
    for field, turns in (("conversations", conversation), ("messages", messages)):
        path = tmp_path / field / "data.jsonl"
        path.parent.mkdir(exist_ok=True)
        write_jsonl(path, [{field: turns}])
        try:
            train_set, _, stats = prepare_datasets(str(path), "train", "auto", embedded_tokenizer, MAX_SEQ_LENGTH,
                                                   False, 0.0, 0)
            outcomes.append(([(e.input_ids, e.target_mask) for e in train_set], stats.truncated))
        except ConfigError as error:
            outcomes.append(str(error).replace(str(path.parent), "").replace("conversations", "messages")
                            .replace(".value", ".content"))
    assert outcomes[0] == outcomes[1]


def test_a_huge_line_is_truncated_and_counted(tmp_path: Path, embedded_tokenizer: Any) -> None:
    records = [{"instruction": "Repeat.", "output": "word " * 100_000}, {"instruction": "Say hi.", "output": "hi"}]
    path = write_jsonl(tmp_path / "huge.jsonl", records)
    train_set, _, stats = prepare_datasets(str(path), "train", "auto", embedded_tokenizer, MAX_SEQ_LENGTH, False,
                                           0.0, 0)
    assert stats.truncated == 1 and len(train_set) == 2
    assert len(train_set[0].input_ids) == MAX_SEQ_LENGTH and train_set[0].num_targets > 0


NUMERIC_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "float", "int | None",
                                                                                 "float | None")]


@settings(max_examples=300, deadline=None, database=None)
@given(name=st.sampled_from(NUMERIC_FIELDS), value=st.one_of(
    st.integers(-2**70, 2**70).map(str), st.floats().map(repr), text,
    st.sampled_from(["nan", "inf", "-inf", "1e400", "", "0x10", "1_000", "1.5", "-0", "none"])))
def test_out_of_range_flag_values_are_one_line_errors_naming_the_flag(name: str, value: str) -> None:
    flag = "--" + name.replace("_", "-")
    try:
        config = parse_config([f"{flag}={value}"])
        validate(config)
    except ConfigError as error:
        assert "\n" not in str(error) and name in str(error), str(error)
        return
    except SystemExit as exit_:  # argparse: our parser prints one line and exits 2
        assert exit_.code == 2
        return
    parsed = getattr(config, name)  # accepted: then it is a finite number (or None where None means default)
    assert parsed is None or math.isfinite(parsed), (name, value, parsed)


@pytest.mark.parametrize("argv, expected", [
    (["--learning-rate", "nan"], "learning_rate must be a finite number >= 0"),
    (["--num-train-epochs", "inf"], "set num_train_epochs to a finite number > 0"),
    (["--per-device-train-batch-size", "0"], "per_device_train_batch_size must be >= 1"),
])
def test_cli_rejects_out_of_range_values_with_exit_2_and_one_line(argv: list[str], expected: str,
                                                                  cli: ForkedCli) -> None:
    completed = cli.run(*argv)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [completed.stderr.strip()] and expected in completed.stderr


def test_cli_names_the_file_line_and_field_of_a_bad_record(tmp_path: Path, tiny_model_dir: Path,
                                                           cli: ForkedCli) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "hi"}]}\n'
                     b'{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    completed = cli.run("--model", str(tiny_model_dir), "--dataset", str(path), "--output-dir", str(tmp_path / "o"))
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip() == (f"error: {path}:2: messages[0] has unknown role 'wizard'; use one of "
                                        f"{', '.join(CHAT_ROLES)}")
    assert not (tmp_path / "o").exists()  # stopped before anything was written
