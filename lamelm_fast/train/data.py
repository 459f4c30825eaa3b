"""Datasets: load records, render them (alpaca, chat or ShareGPT, TRL prompt-completion, text), tokenize with
response-only labels, batch.

Every record keeps where it came from (``file:line``) so that a bad one is reported precisely. Labels are
shifted here, per sequence, so packed sequences never predict across a boundary.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import weakref
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lamelm_fast.train.config import ConfigError, first_line
from lamelm_fast.train.hub import cache_only_if_offline, load_error

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def embedded_dataset_path() -> Path:
    return Path(str(resources.files("lamelm_fast.assets") / "data" / "python_stdlib_functions.jsonl"))


@dataclass
class Record:
    data: dict[str, Any]
    where: str  # "file:line" or "dataset[index]", for error messages


@dataclass
class Example:
    """One tokenized example, stored compactly: token ids as int32 and target flags as bytes, 5 bytes a token where
    Python lists take ~40 (a 500M-token dataset: 2.5 GB of RAM, not 20). Lists are accepted and converted."""

    input_ids: array  # array("i")
    target_mask: array  # array("B"): 1 where token i is predicted by the loss
    # Tokens before the first response token, where --train-on-prompt makes the prompt a target too (0: the mask
    # tells, or there is no prompt); eval samples complete the prompt, not its first tokens.
    prompt_length: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.input_ids, array) and self.input_ids.typecode == "i"):
            self.input_ids = array("i", self.input_ids)
        if not (isinstance(self.target_mask, array) and self.target_mask.typecode == "B"):
            self.target_mask = array("B", self.target_mask)
        if len(self.input_ids) != len(self.target_mask):
            raise ValueError(f"{len(self.input_ids)} tokens but {len(self.target_mask)} target flags")

    @property
    def num_targets(self) -> int:
        # Position 0 has nothing before it, so it can never be a target after the shift.
        return self.target_mask.count(1) - (1 if self.target_mask and self.target_mask[0] else 0)


@dataclass
class DatasetStats:
    source: str
    format: str
    records: int = 0
    truncated: int = 0
    skipped_no_targets: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    # Conversations with a system message whose content is nowhere in the text the chat template renders.
    system_prompts_not_rendered: int = 0

    @property
    def notes(self) -> list[str]:
        """What the banner says about the data beyond the counts: what went wrong, and what to do."""
        notes = []
        if self.system_prompts_not_rendered:
            notes.append(f"{self.system_prompts_not_rendered} of {self.records} records have a system prompt that "
                         "the chat template does not render (Mistral v0.3/Nemo/Small templates render it only "
                         "before a final user turn, and a training conversation ends with an answer): the model "
                         "does not see it in training. Merge the system prompt into the first user message in the "
                         "data, or use a template that renders it")
        return notes


# --------------------------------------------------------------------------- loading


def _decode(path: Path, data: bytes, line_number: int = 1) -> str:
    """UTF-8 text (a leading byte-order mark dropped); an invalid byte is a ConfigError naming its line.

    ``line_number``: the file line ``data`` starts on.
    """
    try:
        return data.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        line = line_number + data.count(b"\n", 0, error.start)
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte {error.start}): re-encode the file as UTF-8"
                          ) from None


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error`` or an exception it was raised from or during is a ``kind``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno}): "
                          "fix or remove that line") from None
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested too deeply to read: fix or remove that line") from None


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            line = _decode(path, raw, line_number)
            if not line.strip():
                continue
            value = _parse_json(line, where)
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a JSON object per line, got {type(value).__name__}")
            records.append(Record(value, where))
    return records


def _read_json(path: Path) -> list[Record]:
    text = _decode(path, path.read_bytes())
    if not text.strip():  # (json's own message would be "Expecting value")
        raise ConfigError(f"dataset {path} has no records (the file is empty): give a file with at least one example")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply to read") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ConfigError(f"{path}: expected a list of records (or an object holding one list)")
        value = lists[0]
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list of records, got {type(value).__name__}")
    records = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: record {index}: expected an object, got {type(item).__name__}")
        records.append(Record(item, f"{path}: record {index}"))
    return records


def _read_text(path: Path) -> list[Record]:
    # A blank line separates documents, so paragraphs of prose stay together.
    text = _decode(path, path.read_bytes())
    records, lines, start = [], [], 1
    for line_number, line in enumerate([*text.splitlines(), ""], start=1):
        if line.strip():
            if not lines:
                start = line_number
            lines.append(line)
        elif lines:
            records.append(Record({"text": "\n".join(lines)}, f"{path}:{start}"))
            lines = []
    return records


def _read_with_datasets(kind: str, path: str, split: str) -> list[Record]:
    import datasets

    datasets.disable_progress_bars()  # the banner reports what was loaded; its bars would only clutter the console
    try:
        if kind == "hub":
            cache_only_if_offline(path)
            table = datasets.load_dataset(path, split=split)
        elif kind == "disk":  # written by save_to_disk: one Dataset, or a DatasetDict of splits
            table = datasets.load_from_disk(path)
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise ConfigError(f"{path} has no split '{split}' (it has {', '.join(table)}): set "
                                      "--dataset-split")
                table = table[split]
        else:
            if kind == "csv":
                with open(path, encoding="utf-8", errors="replace") as file:
                    if len(list(itertools.islice((line for line in file if line.strip()), 2))) < 2:
                        raise ConfigError(f"{path} has no data rows (a header line at most): give a CSV with a header "
                                          "and one example per row")
            table = datasets.load_dataset(kind, data_files=path, split="train")
    except ConfigError:
        raise
    except Exception as error:  # datasets raises many types; all mean "could not read it"
        if kind == "hub":
            raise load_error("dataset", path, error, f"check the hub id and split ('{split}'); for a local file "
                             "give its path", dataset=True) from None
        if _caused_by(error, UnicodeDecodeError):  # datasets wraps it in an error that does not say so
            raise ConfigError(f"{path}: not valid UTF-8: re-encode the file as UTF-8") from None
        raise ConfigError(f"{path}: could not read as {kind}: {first_line(error)}") from None
    if kind == "csv":  # a CSV has no types: a number is text, an empty cell empty text; rows counted from 1
        return [Record({key: "" if value is None else str(value) for key, value in row.items()},
                       f"{path} row {index + 1}") for index, row in enumerate(table)]
    return [Record(dict(row), f"{path}[{index}]") for index, row in enumerate(table)]


def load_records(source: str | None, split: str = "train") -> tuple[str, list[Record]]:
    """Records from a local file, a local dataset directory or a HF datasets id; the embedded set if None."""
    path = embedded_dataset_path() if source is None else Path(source)
    name = str(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _read_jsonl(path)
        elif suffix == ".json":
            records = _read_json(path)
        elif suffix == ".txt":
            records = _read_text(path)
        elif suffix in (".parquet", ".csv"):
            records = _read_with_datasets(suffix[1:], name, split)
        else:
            raise ConfigError(f"{path}: unsupported file type '{suffix}': use one of {', '.join(LOCAL_SUFFIXES)}")
    elif path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        records = _read_with_datasets("disk" if saved else "hub", name, split)
    elif source is not None and (path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))
                                 or path.parent != Path(".") and path.parent.is_dir()):
        # (A missing name inside an existing local directory is a typo, not a hub id: no network round trip.)
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1) \
            if path.parent.is_dir() else []
        hint = f" (did you mean {path.parent / near[0]}?)" if near else ""
        raise ConfigError(f"dataset file {source} not found{hint}: check the path given to --dataset")
    else:
        records = _read_with_datasets("hub", name, split)
    if not records:
        raise ConfigError(f"dataset {name} has no records: give a file with at least one example")
    return name, records


# --------------------------------------------------------------------------- rendering


def detect_format(records: list[Record]) -> str:
    # A key holding None is absent: a parquet file or hub dataset gives every row the union of the rows' keys.
    keys = {key for key, value in records[0].data.items() if value is not None}
    if keys & {"messages", "conversations"}:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise ConfigError(f"{records[0].where}: cannot tell the dataset format from the fields {sorted(keys)}: "
                      "expected 'messages' or ShareGPT 'conversations' (chat), 'prompt'+'completion' "
                      "(prompt_completion), 'instruction'+'output' (alpaca) or 'text'; rename the fields or set "
                      "--dataset-format")


def _string_field(record: Record, name: str, required: bool = True) -> str:
    value = record.data.get(name)
    if value is None:  # missing, or None (a column another row has)
        if not required:
            return ""
        raise ConfigError(f"{record.where}: missing field '{name}': add it to every record (or, if the data is in "
                          "another format, set --dataset-format)")
    if not isinstance(value, str):
        raise ConfigError(f"{record.where}: field '{name}' must be a string, got {type(value).__name__}")
    return _encodable(record, name, value)


def _encodable(record: Record, name: str, text: str) -> str:
    # JSON can spell a lone UTF-16 surrogate (\ud800): it is no character, and the tokenizer cannot take it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConfigError(f"{record.where}: field '{name}' holds an unpaired surrogate "
                          f"({text[error.start]!r}), which is not text: fix or remove that record") from None
    return text


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    # verbose=False: transformers would warn of "indexing errors" for texts over the model's length, which the
    # encoders cut to --max-seq-length themselves.
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    # A text that already ends with the eos token (written out in the data) keeps the one, as TRL's SFTTrainer does.
    return ids if ids[-1:] == [tokenizer.eos_token_id] else [*ids, tokenizer.eos_token_id]


def _prompt_then_completion(tokenizer: Any, prompt: str, completion: str) -> list[tuple[list[int], bool]]:
    """The prompt (with the tokenizer's special tokens: a bos) as prompt, then the completion and an eos as the
    target; each tokenized alone, so no token straddles the two."""
    return [(_encode(tokenizer, prompt, special=True), False),
            (_with_eos(tokenizer, _encode(tokenizer, completion)), True)]


def _encode_alpaca(record: Record, tokenizer: Any, train_on_prompt: bool) -> list[tuple[list[int], bool]]:
    instruction = _string_field(record, "instruction")
    extra = _string_field(record, "input", required=False)
    output = _string_field(record, "output")
    template = ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT
    return _prompt_then_completion(tokenizer, template.format(instruction=instruction, input=extra), output)


def _encode_prompt_completion(record: Record, tokenizer: Any, train_on_prompt: bool) -> list[tuple[list[int], bool]]:
    """TRL's prompt-completion records: two strings, or two lists of messages rendered as one conversation whose
    targets are the completion's assistant answers."""
    if isinstance(record.data.get("prompt"), list):
        prompt, _ = _messages(record, "prompt")
        completion, targets = _messages(record, "completion")
        return _encode_conversation(record, "fields 'prompt' and 'completion'", prompt + completion,
                                    [False] * len(prompt) + targets, tokenizer, train_on_prompt)
    return _prompt_then_completion(tokenizer, _string_field(record, "prompt"), _string_field(record, "completion"))


def _encode_text(record: Record, tokenizer: Any, train_on_prompt: bool) -> list[tuple[list[int], bool]]:
    return [(_with_eos(tokenizer, _encode(tokenizer, _string_field(record, "text"), special=True)), True)]


class _Unlocated(Exception):
    """Why the assistant responses cannot be located in a conversation as its chat template renders it."""


# Stands in for every assistant message's content in a second rendering: letters only, so that no template trims,
# escapes or splits it.
_SENTINEL = "LameLMResponseSentinel"
# Per tokenizer (and its size, which adding tokens changes): a pattern matching an end-of-turn marker, i.e.
# whitespace then one of its special tokens. Listing them costs ~60 us with Llama-3's 256, as much as a render.
_END_OF_TURN: weakref.WeakKeyDictionary[Any, tuple[int, re.Pattern[str] | None]] = weakref.WeakKeyDictionary()


def _end_of_turn(tokenizer: Any) -> re.Pattern[str] | None:
    size = len(tokenizer)
    cached = _END_OF_TURN.get(tokenizer)
    if cached is None or cached[0] != size:
        specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        specials.update(tokenizer.all_special_tokens)
        alternatives = "|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True) if token)
        cached = _END_OF_TURN[tokenizer] = (size, re.compile(rf"\s*(?:{alternatives})") if alternatives else None)
    return cached[1]


def _chat_by_sentinel(messages: list[dict[str, Any]], targets: list[bool], text: str, render: Callable[..., str],
                      end_of_turn: re.Pattern[str] | None) -> list[tuple[str, bool]]:
    """``text`` (the rendered conversation) cut into prompt and target pieces: the content of each message marked
    in ``targets`` (assistant answers) as rendered is a target, with the end-of-turn marker after it (whitespace and a
    special token: ``<|im_end|>``, ``<|eot_id|>``, `` </s>``) and the spaces before it.

    The conversation is rendered again with every target content replaced by a sentinel: between the sentinels
    lies the template's own text (headers, other roles' turns), which ``text`` must hold in the same order; each
    content is what ``text`` has between them. Unlike rendering prefix by prefix, this holds for templates that
    render a turn differently once others follow it (Qwen3's think block, Mistral's system prompt rendered only
    before a final user turn) and costs two renders whatever the number of turns.
    """
    responses = [i for i, target in enumerate(targets) if target]
    if not responses:
        return [(text, False)]
    # A template may render an answer's other fields (tool calls, reasoning) beside its content, where the sentinel
    # standing for the content would leave them labelled prompt. Most such fields are data no template reads
    # (OpenAI's name, an API export's empty annotations or tool_calls, an empty reasoning_content): where the
    # conversation renders the same without them, the answers are located without them (one render more, for such
    # records only); where it does not, the caller cuts the conversation prefix by prefix.
    extra = sorted({key for i in responses for key, value in messages[i].items()
                    if key not in ("role", "content") and value is not None})
    if extra:
        bare = [{"role": message["role"], "content": message["content"]} if target else message
                for message, target in zip(messages, targets, strict=True)]
        if render(bare) != text:
            raise _Unlocated(f"the template renders the assistant messages' fields besides role and content "
                             f"({', '.join(extra)}) as part of the response")
        messages = bare
    sentinel = _SENTINEL
    while any(sentinel in message["content"] for message in messages):
        sentinel += "X"
    parts = render([{**message, "content": sentinel} if target else message
                    for message, target in zip(messages, targets, strict=True)]).split(sentinel)
    if len(parts) != len(responses) + 1:
        raise _Unlocated("the template does not render each assistant message's content once")
    if not text.startswith(parts[0]):
        raise _Unlocated(f"the template's text before messages[{responses[0]}] changes with its content")
    pieces, done, start = [], 0, len(parts[0])
    for k in range(len(responses)):
        before, part, last = parts[k], parts[k + 1], k == len(responses) - 1
        # The template text after a content anchors its end: the first place it occurs, so a content that also
        # appears in a user turn is not mistaken for it (that turn is inside the anchor, with its headers).
        end = len(text) - len(part) if last else text.find(part, start)
        if end < start or (last and not text.endswith(part)):
            where = f"after messages[{responses[k]}]" if last else \
                f"between messages[{responses[k]}] and messages[{responses[k + 1]}]"
            raise _Unlocated(f"the template's text {where} changes with the assistant messages' content (reasoning "
                             "moved into a think block, say)")
        marker = end_of_turn.match(part) if end_of_turn else None
        stop = end + (marker.end() if marker else 0)
        # A space between header and content is the model's to write: the generation prompt ends before it
        # ("[/INST]", then " answer"), and tokenizers join it to the first word.
        begin = max(done, start - (len(before) - len(before.rstrip(" "))))
        pieces += [(text[done:begin], False), (text[begin:stop], True)]
        done, start = stop, end + len(part)
    pieces.append((text[done:], False))
    return pieces


def _chat_by_prefix(messages: list[dict[str, Any]], targets: list[bool], render: Callable[..., str],
                    ) -> list[tuple[str, bool]]:
    """The text each growing prefix of the conversation adds: for a message marked in ``targets``, the generation
    prompt is prompt, the rest (its content, its other fields as rendered, all the template puts after them) a target.

    Needs a template that renders the conversation prefix by prefix, but not one whose text around a response is
    the same whatever the response: it locates what :func:`_chat_by_sentinel` cannot, a last turn's reasoning in
    Qwen3's think block, tool calls."""
    segments = []
    for index, target in enumerate(targets):
        if target:
            segments.append((render(messages[:index], generation_prompt=True), False))
        segments.append((render(messages[:index + 1]), target))
    pieces, done = [], ""
    for text, is_target in segments:
        if not text.startswith(done):
            raise _Unlocated("it does not render this conversation prefix by prefix")
        pieces.append((text[len(done):], is_target))
        done = text
    return pieces


# ShareGPT's speaker names (any case) as chat roles: FastChat's ShareGPT dump (gpt, and chatgpt, bing, bard for the
# model that wrote the answer), Unsloth's standardize_sharegpt aliases (input, output), Gemini's model, and the
# tool's reply as LLaMA-Factory (observation) and OpenAI's legacy API (function) name it.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "input": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "output": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "tool": "tool", "observation": "tool", "function": "tool",
                  "function_response": "tool"}


def _messages(record: Record, field: str) -> tuple[list[dict[str, Any]], list[bool]]:
    """Field ``field`` of ``record`` as chat messages ({role, content, other keys}), and which of them are targets:
    the assistant answers. Under ShareGPT's 'conversations' a turn is {from, value} or {role, content}, named as in
    SHAREGPT_ROLES. A turn with weight 0 is context, not a target, under either field: ShareGPT's weight and OpenAI's
    fine-tuning format's (0 or 1 on an assistant message) mean the same. A key holding None is absent (a column
    another row has)."""
    turns = record.data.get(field)
    if turns is None:
        raise ConfigError(f"{record.where}: missing field '{field}' (a list of {{role, content}} messages); "
                          f"the record has {', '.join(map(repr, record.data)) or 'no fields'}")
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{record.where}: field '{field}' must be a non-empty list of {{role, content}}")
    sharegpt = field == "conversations"
    roles = SHAREGPT_ROLES if sharegpt else {role: role for role in CHAT_ROLES}
    messages, targets = [], []
    for index, turn in enumerate(turns):
        turn = {key: value for key, value in turn.items() if value is not None} if isinstance(turn, dict) else {}
        role_key, content_key = ("from", "value") if sharegpt and not {"role", "content"} & turn.keys() else \
            ("role", "content")
        if not isinstance(turn.get(content_key), str):
            raise ConfigError(f"{record.where}: {field}[{index}] needs a string '{content_key}'")
        content = _encodable(record, f"{field}[{index}].{content_key}", turn.pop(content_key))
        speaker = turn.pop(role_key, None)
        if speaker is None:
            raise ConfigError(f"{record.where}: {field}[{index}] has no '{role_key}'; give one of {', '.join(roles)}")
        role = roles.get(speaker.lower() if sharegpt else speaker) if isinstance(speaker, str) else None
        if role is None:
            raise ConfigError(f"{record.where}: {field}[{index}] has unknown role {speaker!r}; use one of "
                              f"{', '.join(roles)}")
        weight = turn.pop("weight", None)  # a training hint, not text to render
        messages.append({"role": role, "content": content, **turn})
        targets.append(role == "assistant" and weight != 0)
    return messages, targets


def template_clock() -> datetime:
    """Now, by the clock a chat template reads (its ``strftime_now``)."""
    from transformers.utils import chat_template_utils

    return chat_template_utils.datetime.now()


@contextlib.contextmanager
def pinned_template_clock(moment: datetime) -> Iterator[None]:
    """Inside the block chat templates read ``moment`` as now: the text a template writes from ``strftime_now``
    (Llama 3.1+'s "Today Date: 26 Jul 2024" in every conversation) is the same whatever the day, so a run resumed
    after midnight tokenizes as it began. Worker processes forked inside the block inherit it."""
    from transformers.utils import chat_template_utils

    # transformers' strftime_now global calls its module's datetime.now() on each call. Passing our own
    # strftime_now to apply_chat_template would shadow it on 5.17, but 5.2x turns callables given to a template
    # into inert strings; date_string is read by Llama's templates only.
    class Pinned(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:
            return moment if tz is None else moment.astimezone(tz)

    clock, chat_template_utils.datetime = chat_template_utils.datetime, Pinned
    try:
        yield
    finally:
        chat_template_utils.datetime = clock


def writes_date(tokenizer: Any, fmt: str) -> bool:
    """Whether examples of format ``fmt`` may hold a date: the conversations' chat template calls strftime_now."""
    return fmt in ("chat", "prompt_completion") and "strftime_now" in str(getattr(tokenizer, "chat_template", ""))


def _encode_chat(record: Record, tokenizer: Any, train_on_prompt: bool) -> list[tuple[list[int], bool]]:
    field = "conversations" if record.data.get("messages") is None and "conversations" in record.data else "messages"
    messages, targets = _messages(record, field)
    return _encode_conversation(record, f"field '{field}'", messages, targets, tokenizer, train_on_prompt)


# Conversations encoded in this process whose system prompt is nowhere in the text their chat template renders
# (Mistral v0.3/Nemo/Small's templates render it only before a final user turn): a running count, which
# _encode_records reads before and after its records (in this process or a forked worker), so that neither the
# encoders' results nor the examples need to carry it.
_system_prompts_not_rendered = 0


def _count_system_prompt_not_rendered(messages: list[dict[str, Any]], text: str) -> None:
    global _system_prompts_not_rendered
    # Trimmed, as some templates render it (Llama 3's).
    if any(message["role"] == "system" and message["content"].strip() not in text for message in messages):
        _system_prompts_not_rendered += 1


def _encode_conversation(record: Record, fields: str, messages: list[dict[str, Any]], targets: list[bool],
                         tokenizer: Any, train_on_prompt: bool) -> list[tuple[list[int], bool]]:
    """``messages`` rendered with the chat template, each message marked in ``targets`` (an assistant answer) and
    the end of its turn a target; ``fields``: where the record holds the conversation, for errors."""
    if targets[0]:
        # Its header is rendered only as the generation prompt after earlier turns, so it cannot be kept out of
        # the loss; transformers refuses to render the empty conversation before it.
        raise ConfigError(f"{record.where}: {fields} opens with an assistant turn: start the conversation with a "
                          "system or user message")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("the tokenizer has no chat template, so chat records cannot be rendered: "
                          "use a chat model's tokenizer or --dataset-format alpaca/text")

    from jinja2 import TemplateError

    def render(conversation: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
        except (TemplateError, ValueError) as error:  # a template refusing a conversation (roles not alternating)
            raise ConfigError(f"{record.where}: {fields}: the tokenizer's chat template refused this "
                              f"conversation ({first_line(error)}): fix or remove that record") from None

    text = render(messages)
    _count_system_prompt_not_rendered(messages, text)
    try:
        pieces = _chat_by_sentinel(messages, targets, text, render, _end_of_turn(tokenizer))
    except _Unlocated as why:
        try:
            pieces = _chat_by_prefix(messages, targets, render)
        except _Unlocated:
            if not train_on_prompt:
                raise ConfigError(f"{record.where}: the assistant responses cannot be located in this conversation "
                                  f"as the tokenizer's chat template renders it ({why}), and the template does not "
                                  "render it prefix by prefix either: use --train-on-prompt (the loss on every "
                                  "token), or fix or remove that record") from None
            pieces = [(text, True)]  # every token is a target: nothing to locate
    return [(_encode(tokenizer, piece), is_target) for piece, is_target in pieces if piece]


# Each format's record -> (token ids, is target) pieces. Only a conversation reads train_on_prompt: under it, one
# whose responses cannot be located is still text to train on.
ENCODERS: dict[str, Callable[[Record, Any, bool], list[tuple[list[int], bool]]]] = {
    "alpaca": _encode_alpaca, "chat": _encode_chat, "prompt_completion": _encode_prompt_completion,
    "text": _encode_text}


def encode_record(record: Record, fmt: str, tokenizer: Any, train_on_prompt: bool) -> Example:
    ids: list[int] = []
    mask: list[bool] = []
    prompt_length = None
    for piece, is_target in ENCODERS[fmt](record, tokenizer, train_on_prompt):
        if is_target and prompt_length is None:
            prompt_length = len(ids)
        ids.extend(piece)
        mask.extend([is_target or train_on_prompt] * len(piece))
    return Example(ids, mask, (prompt_length or 0) if train_on_prompt else 0)


# Below this many records one process tokenizes (a fork costs more than it saves); above, one worker per
# PARALLEL_CHUNK records up to the CPUs this process may use, so 1M chat records take seconds, not minutes.
PARALLEL_MIN_RECORDS = 20_000
PARALLEL_CHUNK = 5_000


def _encode_records(records: list[Record], fmt: str, tokenizer: Any, train_on_prompt: bool, max_seq_length: int,
                    ) -> tuple[list[Example | None], int, int]:
    """Each record's example truncated to max_seq_length (None: no target left), how many were truncated, and how
    many are conversations whose system prompt the chat template does not render."""
    examples: list[Example | None] = []
    truncated = 0
    system_prompts_not_rendered = _system_prompts_not_rendered
    for record in records:
        example = encode_record(record, fmt, tokenizer, train_on_prompt)
        if len(example.input_ids) > max_seq_length:
            truncated += 1
            example = Example(example.input_ids[:max_seq_length], example.target_mask[:max_seq_length],
                              min(example.prompt_length, max_seq_length))
        examples.append(example if example.num_targets > 0 else None)
    return examples, truncated, _system_prompts_not_rendered - system_prompts_not_rendered


# Set in the parent before forking, read by the workers: (records, fmt, tokenizer, train_on_prompt, max_seq_length).
_WORKER_ARGS: tuple[list[Record], str, Any, bool, int] | None = None


def _encode_chunk(start: int) -> tuple[list[Example | None], int, int]:
    """:func:`_encode_records` over the PARALLEL_CHUNK records from index ``start``."""
    assert _WORKER_ARGS is not None
    records, *settings = _WORKER_ARGS
    return _encode_records(records[start:start + PARALLEL_CHUNK], *settings)


def _tokenizing_workers(num_records: int) -> int:
    if num_records < PARALLEL_MIN_RECORDS or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # every rank on this machine tokenizes too
    return max(1, min(cpus, num_records // PARALLEL_CHUNK))


def encode_all(records: list[Record], fmt: str, tokenizer: Any, train_on_prompt: bool, max_seq_length: int,
               ) -> tuple[list[Example | None], int, int]:
    """:func:`_encode_records` over every record, in forked worker processes for large datasets (the same
    examples in the same order; a bad record's error names it as in one process)."""
    global _WORKER_ARGS
    workers = _tokenizing_workers(len(records))
    if workers == 1:
        return _encode_records(records, fmt, tokenizer, train_on_prompt, max_seq_length)
    _WORKER_ARGS = (records, fmt, tokenizer, train_on_prompt, max_seq_length)
    # A terminal's Ctrl-C reaches every process of its group: the workers are forked with SIGINT blocked, and keep it
    # so, for the parent alone to stop (leaving the pool terminates them) rather than each worker printing a
    # KeyboardInterrupt traceback. Blocked before the fork, not ignored after it: no worker ever has Python's handler.
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        # fork: the workers inherit the tokenizer and the records instead of unpickling them. The Rust tokenizer is
        # used one text at a time here, so no thread pool of its own exists to be forked. A task is a chunk's first
        # index: were it the chunk (megabytes), the pool's exit could hang on the thread still writing one into the
        # pipe to the stopped workers (CPython's terminate drains only what is already in the pipe).
        # imap yields in chunk order, so the error raised is the first bad record's, whichever worker failed first.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)  # a Ctrl-C held back meanwhile is raised here
            results = list(pool.imap(_encode_chunk, range(0, len(records), PARALLEL_CHUNK)))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        _WORKER_ARGS = None
    return ([e for examples, *_ in results for e in examples], sum(result[1] for result in results),
            sum(result[2] for result in results))


def prepare_datasets(source: str | None, split: str, fmt: str, tokenizer: Any, max_seq_length: int,
                     train_on_prompt: bool, eval_split_ratio: float, seed: int,
                     ) -> tuple[list[Example], list[Example], DatasetStats]:
    name, records = load_records(source, split)
    fmt = detect_format(records) if fmt == "auto" else fmt
    stats = DatasetStats(source=name, format=fmt, records=len(records))
    encoded, stats.truncated, stats.system_prompts_not_rendered = encode_all(records, fmt, tokenizer,
                                                                             train_on_prompt, max_seq_length)
    examples = [e for e in encoded if e is not None]
    stats.skipped_no_targets = len(encoded) - len(examples)
    if not examples:
        raise ConfigError(f"every label in {name} is masked ({stats.records} records, {stats.truncated} truncated "
                          f"to {max_seq_length} tokens): raise --max-seq-length, check the response field, "
                          "or use --train-on-prompt")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = math.ceil(len(examples) * eval_split_ratio) if eval_split_ratio > 0 else 0
    num_eval = min(num_eval, len(examples) - 1)
    eval_set = [examples[i] for i in sorted(order[:num_eval])]
    train_set = [examples[i] for i in sorted(order[num_eval:])]
    stats.train_examples, stats.eval_examples = len(train_set), len(eval_set)
    stats.train_tokens = sum(len(e.input_ids) for e in train_set)
    return train_set, eval_set, stats


def attended_length(examples: list[Example]) -> float:
    """sum(L**2) / sum(L): the length a token attends over, averaged over tokens (``flops_per_token``'s seq_len;
    each sequence attends within itself, packed or not)."""
    lengths = [len(e.input_ids) for e in examples]
    return sum(n * n for n in lengths) / max(sum(lengths), 1)


def check_token_ids(examples: list[Example], vocab_size: int | None, pad_token_id: int) -> None:
    """Refuse token ids the model has no embedding row for (a tokenizer that does not match the model): on a GPU
    they would stop the run with a device-side assert, or make the loss NaN."""
    if vocab_size is None:
        return
    largest = max((max(e.input_ids) for e in examples if len(e.input_ids)), default=-1)
    if max(largest, pad_token_id) < vocab_size:
        return
    which = f"token id {largest} in the data" if largest >= vocab_size else f"pad token id {pad_token_id}"
    raise ConfigError(f"the tokenizer gives {which}, but the model's vocabulary has {vocab_size} entries "
                      "(vocab_size in its config.json): the tokenizer does not match the model; use the model's own "
                      "tokenizer, or resize the model's embeddings to the tokenizer before fine-tuning")


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor  # already shifted: labels[t] is the token predicted at position t
    # Packed: each sequence's positions, restarting at 0. Padded rows need neither positions nor a padding mask:
    # the padding is on the right, and under the causal mask no real token attends to a later one, so every real
    # token's output is what it would be alone. Without a mask sdpa runs is_causal (flash) and transformers reads
    # nothing on the host to decide whether a mask is needed.
    position_ids: torch.Tensor | None
    num_tokens: int  # real (non-padding) tokens, counted on the host: no device sync
    num_targets: int
    num_sequences: int
    # Packed: where each sequence starts in the row ([n + 1] int32) and the longest one's length, for padding-free
    # (varlen) attention; known here, so attention needs no device read to find the sequences.
    cu_seq_lens: torch.Tensor | None = None
    max_length: int = 0

    def to(self, device: torch.device) -> Batch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids),
                     self.num_tokens, self.num_targets, self.num_sequences, move(self.cu_seq_lens), self.max_length)

    def attention_kwargs(self) -> dict[str, Any]:
        """transformers' padding-free keyword arguments for a packed batch (flash attention and our varlen sdpa read
        them, other attention implementations ignore them); empty otherwise."""
        if self.cu_seq_lens is None:
            return {}
        return {"cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}


def _tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
    """An array's values as a tensor sharing its memory (frombuffer refuses an empty buffer)."""
    return torch.frombuffer(values, dtype=dtype) if len(values) else torch.empty(0, dtype=dtype)


def token_ids(example: Example) -> torch.Tensor:
    return _tensor(example.input_ids, torch.int32).long()


def shifted_labels(example: Example) -> torch.Tensor:
    """int64 labels: label t is the token at t + 1 where that token is a target, else IGNORE_INDEX."""
    ids, targets = token_ids(example), _tensor(example.target_mask, torch.uint8).bool()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:-1] = torch.where(targets[1:], ids[1:], IGNORE_INDEX)
    return labels


def collate(examples: list[Example], packing: bool, pad_token_id: int) -> Batch:
    if not examples:
        # A rank whose share of a short last batch is empty still runs a forward and backward (DDP and FSDP need
        # every rank there): one padding token, no target, counted as nothing.
        return Batch(torch.full((1, 1), pad_token_id), torch.full((1, 1), IGNORE_INDEX), None, 0, 0, 0)
    lengths = [len(e.input_ids) for e in examples]
    labels = [shifted_labels(e) for e in examples]
    num_targets = sum(e.num_targets for e in examples)
    if packing:
        # One row, positions restarting per sequence: transformers turns that into a block-diagonal mask.
        input_ids = torch.cat([token_ids(e) for e in examples])[None]
        flat_labels = torch.cat(labels)[None]
        positions = torch.cat([torch.arange(n) for n in lengths])[None] if lengths else torch.zeros(1, 0)
        cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        return Batch(input_ids, flat_labels, positions.long(), sum(lengths), num_targets, len(examples),
                     cu_seq_lens, max(lengths))
    width = max(lengths, default=0)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    label_ids = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (example, row_labels) in enumerate(zip(examples, labels, strict=True)):
        n = len(example.input_ids)
        input_ids[row, :n] = token_ids(example)
        label_ids[row, :n] = row_labels
    return Batch(input_ids, label_ids, None, sum(lengths), num_targets, len(examples))


class DataOrder:
    """Deterministic batch order: epoch e is a permutation seeded by (seed, e), so a resume can skip ahead.

    Positions are counted in examples, not batches, so a run can resume with another global batch size (another
    number of ranks) from the same example.
    """

    def __init__(self, num_examples: int, batch_size: int, shuffle: bool, seed: int) -> None:
        self.num_examples, self.batch_size, self.shuffle, self.seed = num_examples, batch_size, shuffle, seed

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> list[list[int]]:
        """The batches of ``epoch`` from its ``start``-th example on."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            order = list(range(self.num_examples))
        return [order[i:i + self.batch_size] for i in range(start, self.num_examples, self.batch_size)]

    def progress(self, epoch: int, next_example: int) -> float:
        """Epochs done, counted in batches as HF's Trainer counts them (a short last batch is a whole one)."""
        return epoch + math.ceil(next_example / self.batch_size) / self.batches_per_epoch


# How records become tokens and targets, saved with each checkpoint: a resume whose fingerprint differs can tell a
# labelling change of this package from changed data. Bump it whenever the same record gets different tokens or
# targets. 1: checkpoints that record none; 2 began with a chat answer's target ending at its end-of-turn token (not
# the newline after it) and an eos written in the data not being doubled.
LABELS_VERSION = 2


def fingerprint(*example_sets: list[Example]) -> str:
    """A digest of the tokenized data (tokens, targets, split): any change to the file, the tokenizer or the data
    settings changes it, so a resume can refuse to continue on different data."""
    digest = hashlib.sha256()
    for examples in example_sets:
        digest.update(len(examples).to_bytes(8, "little"))
        for example in examples:
            digest.update(len(example.input_ids).to_bytes(8, "little"))
            digest.update(array("q", example.input_ids).tobytes())
            digest.update(bytes(example.target_mask))
    return digest.hexdigest()


def iterate_batches(examples: list[Example], batch_size: int, packing: bool, pad_token_id: int,
                    share: Callable[[list[Example]], list[Example]] | None = None) -> Iterator[Batch]:
    """Fixed-order batches (evaluation); ``share`` picks this rank's part of each batch under torchrun."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        yield collate(share(chunk) if share else chunk, packing, pad_token_id)
