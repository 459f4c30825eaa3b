"""Dataset loading, rendering and label masks, checked by decoding what the loss actually sees."""

from __future__ import annotations

import copy
import hashlib
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import chat_records, embedded_records, set_clock, write_jsonl
from lamelm_fast.train.config import ConfigError
from lamelm_fast.train.data import (
    IGNORE_INDEX,
    Example,
    Record,
    collate,
    detect_format,
    encode_record,
    fingerprint,
    load_records,
    pinned_template_clock,
    prepare_datasets,
    shifted_labels,
)


def targets_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.target_mask, strict=True) if m])


def test_alpaca_loss_on_response_only(embedded_tokenizer) -> None:
    fields = {"instruction": "Add two numbers.", "input": "1 and 2", "output": "def add(a, b):\n    return a + b"}
    record = Record(fields, "mem:1")
    example = encode_record(record, "alpaca", embedded_tokenizer, train_on_prompt=False)
    assert targets_text(embedded_tokenizer, example) == "def add(a, b):\n    return a + b<|endoftext|>"
    pairs = zip(example.input_ids, example.target_mask, strict=True)
    prompt = embedded_tokenizer.decode([t for t, m in pairs if not m])
    assert prompt == "### Instruction:\nAdd two numbers.\n\n### Input:\n1 and 2\n\n### Response:\n"
    everything = encode_record(record, "alpaca", embedded_tokenizer, train_on_prompt=True)
    assert all(everything.target_mask) and everything.input_ids == example.input_ids


def test_chat_loss_on_assistant_turns_only(embedded_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list?"},
                {"role": "assistant", "content": "sorted(xs)"}, {"role": "user", "content": "In place?"},
                {"role": "assistant", "content": "xs.sort()"}]
    example = encode_record(Record({"messages": messages}, "mem:1"), "chat", embedded_tokenizer, False)
    assert embedded_tokenizer.decode(example.input_ids) == embedded_tokenizer.apply_chat_template(messages,
                                                                                                  tokenize=False)
    # Each answer and the <|im_end|> that ends it; the newline after it opens the next prompt.
    assert targets_text(embedded_tokenizer, example) == "sorted(xs)<|im_end|>xs.sort()<|im_end|>"


CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# The second answer has whitespace around it: some templates trim it, the others keep it.
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list?"},
                {"role": "assistant", "content": "sorted(xs)"}, {"role": "user", "content": "In place?"},
                {"role": "assistant", "content": " xs.sort()\n"}]


def chat_tokenizer(tokenizer: Any, template: str, specials: tuple[str, ...] = ()) -> Any:
    """A copy of ``tokenizer`` rendering chats with tests/data/chat_templates/<template>.jinja, ``specials`` added
    as special tokens (a model family's control tokens)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (CHAT_TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


def encode_chat(tokenizer: Any, messages: list[dict], train_on_prompt: bool = False, where: str = "mem:1") -> Example:
    example = encode_record(Record({"messages": messages}, where), "chat", tokenizer, train_on_prompt)
    # Trained on exactly the text the template renders, whatever the labels.
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    return example


@pytest.mark.parametrize(("template", "specials", "targets"), [
    (None, (), "sorted(xs)<|im_end|> xs.sort()\n<|im_end|>"),  # the embedded tokenizer's ChatML
    # The last answer opens with an empty think block, the earlier one does not: not prefix by prefix.
    ("qwen3_like", (), "sorted(xs)<|im_end|> xs.sort()\n<|im_end|>"),
    # The system prompt is rendered only in a final user turn: the generation prompt has it, the conversation not,
    # so not prefix by prefix. The space before an answer is the model's to write (the generation prompt ends with
    # [/INST]).
    ("mistral_like", ("[INST]", "[/INST]"), " sorted(xs)<|endoftext|> xs.sort()<|endoftext|>"),
    # An answer trimmed: what the loss sees is the rendered answer, not the record's.
    ("llama3_like", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
     "sorted(xs)<|eot_id|>xs.sort()<|eot_id|>"),
    ("gemma3_like", ("<start_of_turn>", "<end_of_turn>"), "sorted(xs)<end_of_turn>xs.sort()<end_of_turn>"),
    # The generation prompt opens a think block the rendered answers lack: not prefix by prefix.
    ("deepseek_r1_like", ("<|User|>", "<|Assistant|>"), "sorted(xs)<|endoftext|> xs.sort()\n<|endoftext|>"),
    # The end of turn is a space and eos.
    ("llama2_like", (), " sorted(xs) <|endoftext|> xs.sort() <|endoftext|>"),
], ids=["chatml", "qwen3_like", "mistral_like", "llama3_like", "gemma3_like", "deepseek_r1_like", "llama2_like"])
def test_chat_targets_are_each_rendered_answer_and_its_end_of_turn(embedded_tokenizer, template: str | None,
                                                                   specials: tuple[str, ...], targets: str) -> None:
    """Whatever the template does to the conversation, the loss sees each answer as rendered and the special token
    that ends its turn (with the spaces around them that the model writes): never the system prompt, a user turn or
    a header."""
    tokenizer = chat_tokenizer(embedded_tokenizer, template, specials) if template else embedded_tokenizer
    assert targets_text(tokenizer, encode_chat(tokenizer, CONVERSATION)) == targets


def test_a_chat_template_writes_the_pinned_date_whatever_the_clock_says(tmp_path: Path, embedded_tokenizer,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama 3.1+ templates write today's date (strftime_now) into every conversation: under the pin, the run's date
    in every example, tokenized in this process or in forked workers; outside it, the clock's again."""
    from lamelm_fast.train import data

    tokenizer = chat_tokenizer(embedded_tokenizer, "llama31_like",
                               ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    started, next_day = datetime(2026, 11, 23, 23, 0), datetime(2026, 11, 24, 0, 30)
    set_clock(monkeypatch, next_day)
    with pinned_template_clock(started):
        example = encode_chat(tokenizer, CONVERSATION)
    assert "system<|end_header_id|>\n\nToday Date: 23 Nov 2026\n\nBe brief." in tokenizer.decode(example.input_ids)
    assert targets_text(tokenizer, example) == "sorted(xs)<|eot_id|>xs.sort()<|eot_id|>"
    assert "Today Date: 24 Nov 2026" in tokenizer.apply_chat_template(CONVERSATION, tokenize=False)

    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(12))
    monkeypatch.setattr(data, "_tokenizing_workers", lambda n: 2)
    monkeypatch.setattr(data, "PARALLEL_CHUNK", 6)
    with pinned_template_clock(started):
        train_set, _, _ = prepare_datasets(str(path), "train", "auto", tokenizer, 512, False, 0.0, 1)
    assert len(train_set) == 12
    assert all("Today Date: 23 Nov 2026" in tokenizer.decode(e.input_ids) for e in train_set)


def test_chat_reasoning_as_qwen3_like_templates_render_it(embedded_tokenizer) -> None:
    tokenizer = chat_tokenizer(embedded_tokenizer, "qwen3_like")
    reasoned = {"role": "assistant", "content": "<think>\nA copy?\n</think>\n\nsorted(xs)"}
    # An earlier turn's reasoning is not rendered, so not trained on; the last turn's empty think block is the
    # template's, so prompt.
    messages = [CONVERSATION[1], reasoned, *CONVERSATION[3:]]
    assert targets_text(tokenizer, encode_chat(tokenizer, messages)) == "sorted(xs)<|im_end|> xs.sort()\n<|im_end|>"
    # A last turn's reasoning fills the think block, which then depends on the answer: one such turn renders prefix
    # by prefix, and the generation prompt's continuation is the target, reasoning included.
    example = encode_chat(tokenizer, [CONVERSATION[1], reasoned])
    assert targets_text(tokenizer, example) == "<think>\nA copy?\n</think>\n\nsorted(xs)<|im_end|>\n"
    # After an earlier turn, neither way locates it: a clear error; --train-on-prompt trains on all of it.
    messages = [*CONVERSATION[:3], CONVERSATION[3], reasoned]
    with pytest.raises(ConfigError, match=r"^mem:7: the assistant responses cannot be located .*between "
                                          r"messages\[2\] and messages\[4\] changes .*think block.*prefix by prefix "
                                          "either: use --train-on-prompt"):
        encode_chat(tokenizer, messages, where="mem:7")
    assert all(encode_chat(tokenizer, messages, train_on_prompt=True).target_mask)


def test_chat_tool_calls_are_targets(embedded_tokenizer) -> None:
    """A template renders an assistant message's other fields (here tool calls) beside its content, where a
    sentinel for the content cannot show them: the conversation is cut prefix by prefix instead, as the generation
    prompt's continuations."""
    tokenizer = chat_tokenizer(embedded_tokenizer, "qwen3_like")
    call = {"name": "sort", "arguments": {"xs": [3, 1]}}
    messages = [{"role": "user", "content": "Sort 3, 1."}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "[1, 3]"}, {"role": "assistant", "content": "[1, 3]"}]
    assert targets_text(tokenizer, encode_chat(tokenizer, messages)) == (
        '<think>\n\n</think>\n\n<tool_call>\n{"name": "sort", "arguments": {"xs": [3, 1]}}\n</tool_call><|im_end|>\n'
        "<think>\n\n</think>\n\n[1, 3]<|im_end|>\n")


# Fields real data carries on assistant messages that these templates do not render: OpenAI fine-tuning rows (weight,
# name), API exports (annotations, an empty tool_calls, refusal None), Qwen and DeepSeek exports (an empty
# reasoning_content).
UNRENDERED_FIELDS = {"weight": 1, "name": "helper", "annotations": [], "tool_calls": [], "refusal": None,
                     "reasoning_content": ""}


@pytest.mark.parametrize(("template", "specials"), [
    (None, ()), ("qwen3_like", ()), ("mistral_like", ("[INST]", "[/INST]")),
    ("llama3_like", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
], ids=["chatml", "qwen3_like", "mistral_like", "llama3_like"])
def test_assistant_fields_the_template_does_not_render_change_nothing(embedded_tokenizer, template: str | None,
                                                                     specials: tuple[str, ...]) -> None:
    """The answers are located as in the conversation without those fields: with Qwen3- and Mistral-style
    templates, whose multi-turn conversations cannot be cut prefix by prefix, rather than an error; with ChatML, the
    same targets rather than a prefix-by-prefix cut's (which takes the newline after <|im_end|>)."""
    tokenizer = chat_tokenizer(embedded_tokenizer, template, specials) if template else embedded_tokenizer
    messages = [{**message, **UNRENDERED_FIELDS} if message["role"] == "assistant" else message
                for message in CONVERSATION]
    assert encode_chat(tokenizer, messages) == encode_chat(tokenizer, CONVERSATION)


def test_openai_weights_on_messages_choose_the_answers_trained_on(embedded_tokenizer) -> None:
    """OpenAI's fine-tuning format gives an assistant message weight 0 (context) or 1 (trained on), as ShareGPT
    weights its turns: a messages record and the ShareGPT one with the same weights are the same example."""
    messages = [*CONVERSATION[:2], {**CONVERSATION[2], "weight": 0}, CONVERSATION[3], {**CONVERSATION[4], "weight": 1}]
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(message["role"], message["role"]),
                 "value": message["content"], **({"weight": message["weight"]} if "weight" in message else {})}
                for message in messages]
    for tokenizer in (embedded_tokenizer, chat_tokenizer(embedded_tokenizer, "qwen3_like")):
        example = encode_chat(tokenizer, messages)
        assert targets_text(tokenizer, example) == " xs.sort()\n<|im_end|>"
        assert encode_record(Record({"conversations": sharegpt}, "mem:1"), "chat", tokenizer, False) == example


def test_system_prompts_the_template_does_not_render_are_counted_and_reported(
        tmp_path: Path, embedded_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mistral v0.3/Nemo/Small templates render the system prompt only before a final user turn: at inference, never
    in a training conversation, which ends with an answer. The records it leaves out are counted (in worker processes
    too), and the banner says so and what to do."""
    from lamelm_fast.train import data, loop
    from lamelm_fast.train.config import TrainConfig

    tokenizer = chat_tokenizer(embedded_tokenizer, "mistral_like", ("[INST]", "[/INST]"))
    assert "Be brief." not in tokenizer.decode(encode_chat(tokenizer, CONVERSATION).input_ids)
    assert "[INST] Be brief.\n\nIn place?[/INST]" in tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False)
    # 12 records, 8 with a system prompt (multi-turn, single-turn), 4 without.
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]},
                                                 {"messages": CONVERSATION[1:]}] * 4)
    _, _, stats = prepare_datasets(str(path), "train", "auto", tokenizer, 512, False, 0.0, 1)
    assert stats.system_prompts_not_rendered == 8
    monkeypatch.setattr(data, "_tokenizing_workers", lambda n: 2)
    monkeypatch.setattr(data, "PARALLEL_CHUNK", 5)
    assert prepare_datasets(str(path), "train", "auto", tokenizer, 512, False, 0.0, 1)[2] == stats
    config = TrainConfig(finetune="lora", max_seq_length=512, learning_rate=2e-4)
    banner = loop._banner(config, stats, torch.device("cpu"), 10, 10, 1, 1, [], None)
    assert ("\n  note: 8 of 12 records have a system prompt that the chat template does not render (Mistral "
            "v0.3/Nemo/Small templates render it only before a final user turn") in banner
    assert banner.count("Merge the system prompt into the first user message in the data, or use a template that "
                        "renders it") == 1
    # Templates that render it, trimmed (Llama 3's) or not: nothing to say.
    padded = [{"role": "system", "content": " Be brief.\n"}, *CONVERSATION[1:]]
    write_jsonl(path, [{"messages": CONVERSATION}, {"messages": padded}])
    llama3 = chat_tokenizer(embedded_tokenizer, "llama3_like",
                            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    for renders_it in (embedded_tokenizer, llama3):
        stats = prepare_datasets(str(path), "train", "auto", renders_it, 512, False, 0.0, 1)[2]
        assert stats.system_prompts_not_rendered == 0 and stats.notes == []


def test_chat_answers_are_located_where_the_template_puts_them(embedded_tokenizer) -> None:
    from lamelm_fast.train.data import _SENTINEL

    # Answers equal to other turns (not mistaken for them), an empty one (its end of turn is still learned), a
    # tool turn (prompt), and text holding the sentinel that stands for the answers (another one is taken).
    messages = [{"role": "system", "content": "ok"}, {"role": "user", "content": "ok"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "ok"},
                {"role": "assistant", "content": ""}, {"role": "tool", "content": "ok"},
                {"role": "user", "content": f"Spell {_SENTINEL}."}, {"role": "assistant", "content": f"{_SENTINEL}X"}]
    example = encode_chat(embedded_tokenizer, messages)
    assert targets_text(embedded_tokenizer, example) == f"ok<|im_end|><|im_end|>{_SENTINEL}X<|im_end|>"


def test_chat_train_on_prompt_targets_everything_and_keeps_the_prompt_length(embedded_tokenizer) -> None:
    example = encode_chat(embedded_tokenizer, CONVERSATION, train_on_prompt=True)
    assert all(example.target_mask)
    assert embedded_tokenizer.decode(example.input_ids[:example.prompt_length]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSort a list?<|im_end|>\n<|im_start|>assistant\n")


# CONVERSATION as ShareGPT writes it: speakers named as in its data, in any case; the keys other rows have (a
# parquet file gives every row their union, None where missing) and the per-turn weights are not rendered.
SHAREGPT_CONVERSATION = [{"from": "system", "value": "Be brief.", "weight": None},
                         {"from": "human", "value": "Sort a list?", "weight": 0.0},
                         {"from": "gpt", "value": "sorted(xs)", "weight": 1.0},
                         {"from": "Human", "value": "In place?", "weight": None},
                         {"from": "GPT", "value": " xs.sort()\n", "weight": None}]


@pytest.mark.parametrize(("template", "specials"), [
    (None, ()), ("qwen3_like", ()), ("mistral_like", ("[INST]", "[/INST]")),
    ("llama3_like", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
], ids=["chatml", "qwen3_like", "mistral_like", "llama3_like"])
def test_sharegpt_records_train_exactly_as_the_same_messages(embedded_tokenizer, template: str | None,
                                                             specials: tuple[str, ...]) -> None:
    tokenizer = chat_tokenizer(embedded_tokenizer, template, specials) if template else embedded_tokenizer
    expected = encode_chat(tokenizer, CONVERSATION)
    # Also the variant that keeps {role, content} under 'conversations', with ShareGPT's names for the roles.
    variant = [{"role": {"human": "user", "gpt": "model"}.get(turn["from"].lower(), turn["from"]),
                "content": turn["value"]} for turn in SHAREGPT_CONVERSATION]
    for turns in (SHAREGPT_CONVERSATION, variant):
        example = encode_record(Record({"conversations": turns, "id": "c1"}, "mem:1"), "chat", tokenizer, False)
        assert example == expected
    everything = encode_record(Record({"conversations": SHAREGPT_CONVERSATION}, "mem:1"), "chat", tokenizer, True)
    assert everything == encode_chat(tokenizer, CONVERSATION, train_on_prompt=True)


def test_sharegpt_speaker_names_and_weights(embedded_tokenizer) -> None:
    # The raw ShareGPT dump names the model that answered; LLaMA-Factory calls a tool's reply an observation.
    turns = [{"from": "user", "value": "Sort 3, 1."}, {"from": "chatgpt", "value": "a"},
             {"from": "observation", "value": "[1, 3]"}, {"from": "input", "value": "Again?"},
             {"from": "bing", "value": "b"}, {"from": "human", "value": "Once more?"}, {"from": "bard", "value": "c"},
             {"from": "human", "value": "And?"}, {"from": "model", "value": "d"}]
    example = encode_record(Record({"conversations": turns}, "mem:1"), "chat", embedded_tokenizer, False)
    assert embedded_tokenizer.decode(example.input_ids).count("<|im_start|>tool\n[1, 3]<|im_end|>") == 1
    assert targets_text(embedded_tokenizer, example) == "a<|im_end|>b<|im_end|>c<|im_end|>d<|im_end|>"
    # A turn weighted 0 is context, not a target.
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello", "weight": 0},
             {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!", "weight": 1}]
    example = encode_record(Record({"conversations": turns}, "mem:1"), "chat", embedded_tokenizer, False)
    assert targets_text(embedded_tokenizer, example) == "Bye!<|im_end|>"


@pytest.mark.parametrize(("turn", "message"), [
    ({"from": "narrator", "value": "Once upon a time"},
     r"has unknown role 'narrator'; use one of system, human, user, input, gpt, .*, tool, observation, function, "
     "function_response$"),
    # LLaMA-Factory's function_call is the assistant's tool call written as text: no chat role renders it as one.
    ({"from": "function_call", "value": '{"name": "sort"}'}, "has unknown role 'function_call'; use one of "),
    ({"value": "hi"}, "has no 'from'; give one of system, human, "),
    ({"from": "gpt", "value": 7}, "needs a string 'value'$"),
    ({"role": "assistant"}, "needs a string 'content'$"),
    ("hi", "needs a string 'value'$"),
], ids=["unknown_role", "function_call", "no_role", "value_not_text", "no_content", "not_an_object"])
def test_sharegpt_errors_name_the_record_the_turn_and_the_role(embedded_tokenizer, turn: Any, message: str) -> None:
    record = Record({"conversations": [{"from": "human", "value": "Hi"}, turn]}, "data.jsonl:3")
    with pytest.raises(ConfigError, match=rf"^data.jsonl:3: conversations\[1\] {message}"):
        encode_record(record, "chat", embedded_tokenizer, False)


def test_prompt_completion_strings_train_on_the_completion_and_eos(embedded_tokenizer) -> None:
    example = encode_record(Record({"prompt": "The sky is", "completion": " blue."}, "mem:1"), "prompt_completion",
                            embedded_tokenizer, False)
    assert embedded_tokenizer.decode(example.input_ids) == "The sky is blue.<|endoftext|>"
    assert targets_text(embedded_tokenizer, example) == " blue.<|endoftext|>"
    # A text that already ends with the eos token keeps the one, as in TRL; alpaca and text records too.
    for fields, fmt, targets in (({"prompt": "The sky is", "completion": " blue.<|endoftext|>"}, "prompt_completion",
                                  " blue.<|endoftext|>"),
                                 ({"instruction": "Colour?", "output": "blue<|endoftext|>"}, "alpaca",
                                  "blue<|endoftext|>"),
                                 ({"text": "The sky is blue.<|endoftext|>"}, "text", "The sky is blue.<|endoftext|>")):
        example = encode_record(Record(fields, "mem:1"), fmt, embedded_tokenizer, False)
        assert targets_text(embedded_tokenizer, example) == targets
    for fields, message in (({"prompt": "a", "completion": None}, "missing field 'completion'"),
                            ({"prompt": "a", "completion": 5}, "field 'completion' must be a string, got int"),
                            ({"prompt": {"text": "a"}, "completion": "b"},
                             "field 'prompt' must be a string, got dict")):
        with pytest.raises(ConfigError, match=f"^mem:1: {message}"):
            encode_record(Record(fields, "mem:1"), "prompt_completion", embedded_tokenizer, False)


def test_conversational_prompt_completion_trains_on_the_completions_answers(embedded_tokenizer) -> None:
    def encode(prompt: list[dict], completion: list[dict], tokenizer: Any = embedded_tokenizer) -> Example:
        example = encode_record(Record({"prompt": prompt, "completion": completion}, "mem:1"), "prompt_completion",
                                tokenizer, False)
        assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(prompt + completion,
                                                                                      tokenize=False)
        return example

    # An answer in the prompt is context; every answer in the completion is a target, a tool's reply is not.
    completion = [{"role": "assistant", "content": "Calling sort."}, {"role": "tool", "content": "[1, 3]"},
                  {"role": "assistant", "content": "[1, 3]"}]
    example = encode(CONVERSATION[:4], completion)
    assert targets_text(embedded_tokenizer, example) == "Calling sort.<|im_end|>[1, 3]<|im_end|>"
    # The same conversation as a chat record trains on the prompt's answer too, and nothing else differs.
    tokenizer = chat_tokenizer(embedded_tokenizer, "qwen3_like")
    example = encode(CONVERSATION[:4], CONVERSATION[4:], tokenizer)
    assert targets_text(tokenizer, example) == " xs.sort()\n<|im_end|>"
    as_chat = encode_chat(tokenizer, CONVERSATION)
    assert example.input_ids == as_chat.input_ids and targets_text(tokenizer, as_chat) == (
        "sorted(xs)<|im_end|> xs.sort()\n<|im_end|>")
    for fields, message in (({"prompt": CONVERSATION[:2], "completion": "sorted(xs)"},
                             r"field 'completion' must be a non-empty list of \{role, content\}"),
                            ({"prompt": CONVERSATION[:2], "completion": [{"from": "gpt", "value": "x"}]},
                             r"completion\[0\] needs a string 'content'"),
                            ({"prompt": [{"role": "human", "content": "Hi"}], "completion": CONVERSATION[2:3]},
                             r"prompt\[0\] has unknown role 'human'; use one of system, user, assistant, tool$")):
        with pytest.raises(ConfigError, match=f"^mem:1: {message}"):
            encode_record(Record(fields, "mem:1"), "prompt_completion", embedded_tokenizer, False)


def test_format_detection_of_each_shape() -> None:
    for fields, fmt in (
        ({"conversations": SHAREGPT_CONVERSATION}, "chat"),
        ({"conversations": [{"role": "user", "content": "Hi"}]}, "chat"),
        ({"prompt": "The sky is", "completion": " blue."}, "prompt_completion"),
        ({"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}, "prompt_completion"),
        ({"prompt": "Hi", "completion": "Hello", "text": "Hi Hello"}, "prompt_completion"),
        # HuggingFaceH4/ultrachat_200k and no_robots: 'prompt' is the first user turn of the conversation.
        ({"prompt": "Hi", "prompt_id": "1", "messages": CONVERSATION}, "chat"),
        # A parquet file's or a hub dataset's rows hold the union of the rows' columns: None is absent.
        ({"messages": None, "conversations": SHAREGPT_CONVERSATION, "text": None}, "chat"),
        ({"messages": None, "conversations": None, "instruction": "a", "output": "b"}, "alpaca"),
        ({"messages": None, "prompt": "a", "completion": "b"}, "prompt_completion"),
    ):
        assert detect_format([Record(fields, "x")]) == fmt, fields


def test_an_unknown_shape_is_an_error_listing_every_accepted_one() -> None:
    with pytest.raises(ConfigError, match=r"^x: cannot tell the dataset format from the fields \['answer', "
                                          r"'question'\]: expected 'messages' or ShareGPT 'conversations' \(chat\), "
                                          r"'prompt'\+'completion' \(prompt_completion\), 'instruction'\+'output' "
                                          r"\(alpaca\) or 'text'; rename the fields or set --dataset-format$"):
        detect_format([Record({"question": "q", "answer": "a", "messages": None}, "x")])


def test_files_in_the_sharegpt_and_prompt_completion_shapes(tmp_path: Path, embedded_tokenizer) -> None:
    import pandas as pd

    from lamelm_fast.train.cli import parse_config

    def prepare(path: Path, fmt: str = "auto") -> tuple[list[Example], str]:
        examples, held_out, stats = prepare_datasets(str(path), "train", fmt, embedded_tokenizer, 256, False, 0.0, 0)
        return examples, stats.format

    as_messages, fmt = prepare(write_jsonl(tmp_path / "messages.jsonl", [{"messages": CONVERSATION}] * 2))
    assert fmt == "chat"
    # ShareGPT rows beside a messages row in one parquet file: each row has both columns, one of them None; the
    # turns without a weight get a None one.
    pd.DataFrame([{"conversations": SHAREGPT_CONVERSATION}, {"messages": CONVERSATION}]).to_parquet(
        tmp_path / "sharegpt.parquet")
    _, rows = load_records(str(tmp_path / "sharegpt.parquet"))
    assert rows[1].data["conversations"] is None and rows[0].data["messages"] is None
    assert prepare(tmp_path / "sharegpt.parquet") == (as_messages, "chat")
    write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": SHAREGPT_CONVERSATION}] * 2)
    assert prepare(tmp_path / "sharegpt.jsonl", "chat") == (as_messages, "chat")

    plain = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "Grass is", "completion": " green."}]
    for path in (write_jsonl(tmp_path / "plain.jsonl", plain), tmp_path / "plain.parquet"):
        pd.DataFrame(plain).to_parquet(tmp_path / "plain.parquet")
        examples, fmt = prepare(path)
        assert fmt == "prompt_completion"
        assert [targets_text(embedded_tokenizer, e) for e in examples] == [" blue.<|endoftext|>",
                                                                           " green.<|endoftext|>"]
    conversational = [{"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}] * 2
    pd.DataFrame(conversational).to_parquet(tmp_path / "conversational.parquet")
    for path in (write_jsonl(tmp_path / "conversational.jsonl", conversational), tmp_path / "conversational.parquet"):
        examples, fmt = prepare(path, "prompt_completion")
        assert fmt == "prompt_completion" and [e.input_ids for e in examples] == [e.input_ids for e in as_messages]
        assert [targets_text(embedded_tokenizer, e) for e in examples] == [" xs.sort()\n<|im_end|>"] * 2
    assert parse_config(["--dataset-format", "prompt_completion"]).dataset_format == "prompt_completion"
    # A row without a field its file's other rows have: None in a parquet file, a missing field all the same.
    pd.DataFrame([{"instruction": "a", "output": "b"}, {"instruction": "c"}]).to_parquet(tmp_path / "alpaca.parquet")
    with pytest.raises(ConfigError, match=r"alpaca.parquet\[1\]: missing field 'output'"):
        prepare(tmp_path / "alpaca.parquet")


def test_format_detection_and_text_files(tmp_path: Path, embedded_tokenizer) -> None:
    assert detect_format([Record({"messages": []}, "x")]) == "chat"
    assert detect_format([Record({"instruction": "a", "output": "b", "input": ""}, "x")]) == "alpaca"
    assert detect_format([Record({"text": "a"}, "x")]) == "text"
    (tmp_path / "doc.txt").write_text("first para\nstill first\n\n\nsecond para\n")
    _, records = load_records(str(tmp_path / "doc.txt"))
    assert [r.data["text"] for r in records] == ["first para\nstill first", "second para"]
    assert records[1].where.endswith("doc.txt:5")
    example = encode_record(records[0], "text", embedded_tokenizer, False)
    assert targets_text(embedded_tokenizer, example) == "first para\nstill first<|endoftext|>"


@pytest.mark.parametrize("suffix", ["parquet", "csv", "json"])
def test_tabular_and_json_files_load_like_jsonl(tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    records = embedded_records(5)
    frame = pd.DataFrame(records)
    path = tmp_path / f"data.{suffix}"
    if suffix == "parquet":
        frame.to_parquet(path)
    elif suffix == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records")
    _, loaded = load_records(str(path))
    assert [{k: r.data[k] or "" for k in ("instruction", "input", "output")} for r in loaded] == records


def test_errors_say_what_is_missing_or_wrong_in_plain_words(tmp_path: Path, embedded_tokenizer) -> None:
    """A CSV that is not UTF-8 is named as such (datasets hides it inside its own error); a record without the
    chat field is missing it (not a malformed list); a message without a role has none (not an unknown None); JSON's
    own "... at" messages do not stutter."""
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("instruction,input,output\nsay caf\u00e9,,hello\nb,,c\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^\S*latin1.csv: not valid UTF-8: re-encode the file as UTF-8$"):
        load_records(str(latin1))
    with pytest.raises(ConfigError, match=r"^mem:1: missing field 'messages' \(a list of \{role, content\} messages\); "
                                          r"the record has 'instruction', 'output'$"):
        encode_record(Record({"instruction": "a", "output": "b"}, "mem:1"), "chat", embedded_tokenizer, False)
    with pytest.raises(ConfigError, match=r"^mem:1: messages\[0\] has no 'role'; give one of system, user, "):
        encode_record(Record({"messages": [{"content": "hi"}]}, "mem:1"), "chat", embedded_tokenizer, False)
    control = tmp_path / "control.jsonl"
    control.write_text('{"instruction": "a\x01b", "output": "b"}\n')
    with pytest.raises(ConfigError, match=r"not valid JSON \(Invalid control character at column 19\)"):
        load_records(str(control))
    (tmp_path / "empty.json").write_text("\n")
    with pytest.raises(ConfigError, match=r"empty.json has no records \(the file is empty\)"):
        load_records(str(tmp_path / "empty.json"))


def test_a_record_longer_than_the_model_is_encoded_without_transformers_warning_of_indexing_errors(
        embedded_tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    """The loader cuts it to --max-seq-length afterwards: the tokenizer's warning would only alarm."""
    long = Record({"instruction": "word " * 3 * embedded_tokenizer.model_max_length, "output": "yes"}, "mem:1")
    with caplog.at_level("WARNING"):
        example = encode_record(long, "alpaca", embedded_tokenizer, True)
    assert len(example.input_ids) > embedded_tokenizer.model_max_length
    assert not [r for r in caplog.records if "indexing errors" in r.getMessage()]


def test_csv_cells_are_text_and_errors_name_the_row(tmp_path: Path, embedded_tokenizer) -> None:
    path = tmp_path / "numbers.csv"
    path.write_text("instruction,input,output\nWhat is 6 x 7?,,42\nName a prime,,\nSay hi,,hi\n")
    _, records = load_records(str(path))
    assert [r.data for r in records][:2] == [{"instruction": "What is 6 x 7?", "input": "", "output": "42"},
                                             {"instruction": "Name a prime", "input": "", "output": ""}]
    assert records[2].where == f"{path} row 3"
    for empty in ("", "instruction,output\n"):
        (tmp_path / "empty.csv").write_text(empty)
        with pytest.raises(ConfigError, match="empty.csv has no data rows"):
            load_records(str(tmp_path / "empty.csv"))
    path.write_text("prompt,output\nx,1\n")
    with pytest.raises(ConfigError, match=r"numbers.csv row 1: "):
        prepare_datasets(str(path), "train", "alpaca", embedded_tokenizer, 48, False, 0.0, 3)


def test_a_saved_dataset_directory_and_typos_in_local_paths(tmp_path: Path) -> None:
    import datasets

    records = embedded_records(4)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "splits"))
    for name in ("saved", "splits"):
        _, loaded = load_records(str(tmp_path / name))
        assert [r.data for r in loaded] == records
    with pytest.raises(ConfigError, match="has no split 'test' \\(it has train\\): set --dataset-split"):
        load_records(str(tmp_path / "splits"), "test")
    write_jsonl(tmp_path / "alpaca.jsonl", records)
    for typo in ("alpaca.jsonll", "alpaca"):  # in an existing directory: a typo, not a hub id (no network wait)
        with pytest.raises(ConfigError, match=f"{typo} not found \\(did you mean .*alpaca.jsonl\\?\\)"):
            load_records(str(tmp_path / typo))


def test_truncation_is_counted_and_split_is_deterministic(tmp_path: Path, embedded_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", embedded_records(40, max_chars=2000))
    kwargs = dict(split="train", fmt="auto", tokenizer=embedded_tokenizer, max_seq_length=48,
                  train_on_prompt=False, eval_split_ratio=0.25, seed=3)
    train, held_out, stats = prepare_datasets(str(path), **kwargs)
    lengths = [len(encode_record(Record(r, "x"), "alpaca", embedded_tokenizer, False).input_ids)
               for r in embedded_records(40, max_chars=2000)]
    assert stats.truncated == sum(n > 48 for n in lengths) > 0
    assert all(len(e.input_ids) <= 48 for e in train + held_out)
    assert stats.train_examples + stats.eval_examples + stats.skipped_no_targets == 40
    kept = stats.train_examples + stats.eval_examples
    assert stats.eval_examples == math.ceil(kept * 0.25)
    again = prepare_datasets(str(path), **kwargs)
    assert [e.input_ids for e in again[0]] == [e.input_ids for e in train]


def test_empty_after_masking_is_an_error(tmp_path: Path, embedded_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", embedded_records(3))
    with pytest.raises(ConfigError, match="every label in .* is masked"):
        prepare_datasets(str(path), "train", "auto", embedded_tokenizer, 8, False, 0.0, 0)


def test_packed_labels_never_cross_a_sequence_boundary(embedded_tokenizer) -> None:
    records = [Record(r, "x") for r in embedded_records(3)]
    examples = [encode_record(r, "alpaca", embedded_tokenizer, False) for r in records]
    packed = collate(examples, packing=True, pad_token_id=0)
    padded = collate(examples, packing=False, pad_token_id=0)
    lengths = [len(e.input_ids) for e in examples]
    assert packed.input_ids.shape == (1, sum(lengths))
    assert packed.position_ids[0].tolist() == [i for n in lengths for i in range(n)]
    # The last token of every sequence predicts nothing; inside a sequence label[t] = token[t + 1].
    ends = torch.tensor(lengths).cumsum(0) - 1
    assert (packed.labels[0, ends] == IGNORE_INDEX).all()
    assert packed.labels[0].tolist() == [t for e in examples for t in shifted_labels(e)]
    assert packed.num_targets == padded.num_targets == int((padded.labels != IGNORE_INDEX).sum())
    assert padded.num_tokens == sum(lengths) and padded.position_ids is None


def test_dataset_directory_and_hub_ids_go_through_datasets(tmp_path: Path) -> None:
    # A local directory takes the same datasets.load_dataset call as a hub id (the hub is unreachable here).
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    records = embedded_records(6)
    write_jsonl(folder / "train.jsonl", records)
    name, loaded = load_records(str(folder), split="train")
    assert name == str(folder) and [r.data["output"] for r in loaded] == [r["output"] for r in records]
    with pytest.raises(ConfigError, match="could not load dataset 'no-such-org/no-such-set'"):
        load_records("no-such-org/no-such-set")


def test_examples_are_stored_compactly_and_fingerprint_as_lists_did(embedded_tokenizer) -> None:
    example = Example([5, 300_000, 7, 9], [True, False, True, True])
    assert (example.input_ids.itemsize, example.target_mask.itemsize) == (4, 1)  # bytes per token: 4 + 1
    assert example.num_targets == 2 and shifted_labels(example).tolist() == [IGNORE_INDEX, 7, 9, IGNORE_INDEX]
    with pytest.raises(ValueError, match="3 tokens but 2 target flags"):
        Example([1, 2, 3], [True, False])
    # The digest a checkpoint keeps to refuse resuming on other data is the one list-held examples gave.
    examples = [encode_record(Record(r, "x"), "alpaca", embedded_tokenizer, False) for r in embedded_records(3)]
    digest = hashlib.sha256()
    for part in (examples, []):
        digest.update(len(part).to_bytes(8, "little"))
        for e in part:
            ids, mask = list(e.input_ids), [bool(m) for m in e.target_mask]
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(b"".join(t.to_bytes(8, "little", signed=True) for t in ids))
            digest.update(bytes(mask))
    assert fingerprint(examples, []) == digest.hexdigest()


def test_large_datasets_tokenize_in_worker_processes_to_the_same_examples(
        tmp_path: Path, embedded_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    from lamelm_fast.train import data

    records = embedded_records(60)
    records[7]["output"] = ""  # after truncation to 48 tokens some examples keep no target: skipped, and counted
    path = write_jsonl(tmp_path / "d.jsonl", records)
    serial = prepare_datasets(str(path), "train", "auto", embedded_tokenizer, 48, False, 0.1, 3)
    monkeypatch.setattr(data, "_tokenizing_workers", lambda n: 3)
    monkeypatch.setattr(data, "PARALLEL_CHUNK", 7)  # 9 chunks over 3 processes
    parallel = prepare_datasets(str(path), "train", "auto", embedded_tokenizer, 48, False, 0.1, 3)
    assert parallel[2] == serial[2] and serial[2].truncated > 0 and serial[2].skipped_no_targets > 0
    for ours, theirs in ((parallel[0], serial[0]), (parallel[1], serial[1])):
        assert [(e.input_ids, e.target_mask) for e in ours] == [(e.input_ids, e.target_mask) for e in theirs]
    records[45]["output"] = 7  # a bad record in a worker's chunk: the same error as in one process
    write_jsonl(path, records)
    with pytest.raises(ConfigError, match=r"d.jsonl:46: field 'output' must be a string"):
        prepare_datasets(str(path), "train", "auto", embedded_tokenizer, 48, False, 0.1, 3)


def _encode_chunk_slowly_if_first_bad(start: int) -> tuple:
    """A worker whose chunk holds the earlier bad record (line 13 of the file) fails last."""
    from lamelm_fast.train import data

    records, *settings = data._WORKER_ARGS
    chunk = records[start:start + data.PARALLEL_CHUNK]
    if any(record.where.endswith(":13") for record in chunk):
        time.sleep(1.0)
    return data._encode_records(chunk, *settings)


def test_parallel_tokenization_names_the_first_bad_record_whichever_worker_fails_first(
        tmp_path: Path, embedded_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    from lamelm_fast.train import data

    records = embedded_records(30)
    records[12]["output"] = 7  # line 13, in the second chunk; line 15 in the third fails first
    records[14]["output"] = 8
    path = write_jsonl(tmp_path / "d.jsonl", records)
    monkeypatch.setattr(data, "_tokenizing_workers", lambda n: 3)
    monkeypatch.setattr(data, "PARALLEL_CHUNK", 7)
    monkeypatch.setattr(data, "_encode_chunk", _encode_chunk_slowly_if_first_bad)
    with pytest.raises(ConfigError, match=r"d.jsonl:13: field 'output' must be a string"):
        prepare_datasets(str(path), "train", "auto", embedded_tokenizer, 48, False, 0.1, 3)


def test_worker_count_follows_size_cpus_and_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from lamelm_fast.train import data

    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data._tokenizing_workers(data.PARALLEL_MIN_RECORDS - 1) == 1
    assert data._tokenizing_workers(30_000) == 30_000 // data.PARALLEL_CHUNK
    assert data._tokenizing_workers(1_000_000) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 ranks on this machine share its CPUs
    assert data._tokenizing_workers(1_000_000) == 2


def test_a_tokenizer_bigger_than_the_model_is_refused_before_training(tmp_path: Path, embedded_tokenizer,
                                                                     small_alpaca: Path) -> None:
    """Token ids past the model's vocabulary would stop a GPU run with a device-side assert, or train on NaN."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from lamelm_fast.train import TrainConfig, train
    from lamelm_fast.train.data import check_token_ids

    model_dir = tmp_path / "small-vocab"
    LlamaForCausalLM(tiny_llama_config(64)).save_pretrained(model_dir)
    embedded_tokenizer.save_pretrained(model_dir)  # 4096 tokens for a 64-entry embedding
    config = TrainConfig(model=str(model_dir), dataset=str(small_alpaca), finetune="full", max_steps=1,
                         output_dir=str(tmp_path / "run"), quiet=True)
    with pytest.raises(ConfigError, match=r"token id \d+ in the data, but the model's vocabulary has 64 entries"):
        train(config)
    assert not (tmp_path / "run").exists()
    examples = [Example([3, 63], [False, True])]
    check_token_ids(examples, 64, pad_token_id=0)
    with pytest.raises(ConfigError, match="pad token id 64"):
        check_token_ids(examples, 64, pad_token_id=64)
