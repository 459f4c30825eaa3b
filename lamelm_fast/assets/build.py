"""Rebuild the embedded default dataset and tokenizer from the running Python's standard library.

Run with ``python -m lamelm_fast.assets.build``. The output is byte-identical across runs with the same
Python and ``tokenizers`` versions, so the shipped files can be regenerated and diffed.
"""

from __future__ import annotations

import ast
import inspect
import json
import random
import sys
import sysconfig
import textwrap
import tokenize
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ASSETS_DIR = Path(__file__).resolve().parent
DATA_FILE = ASSETS_DIR / "data" / "python_stdlib_functions.jsonl"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

SKIP_DIRS = frozenset(
    {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
)
DOC_MIN_CHARS, DOC_MAX_CHARS = 20, 600
MAX_OUTPUT_CHARS = 1200
NUM_RECORDS = 4000
SEED = 1234
MAX_DATA_BYTES = 3_000_000

VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]  # order fixes ids 0, 1, 2
MODEL_MAX_LENGTH = 1024
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A few phrasings so the model does not learn a single fixed prefix.
TEMPLATES = (
    "Write the Python {kind} `{sig}` from the `{module}` module:\n\n{doc}",
    "Implement the {kind} `{sig}` of Python's `{module}` module, as documented below.\n\n{doc}",
    "Here is the docstring of the {kind} `{sig}` in the `{module}` module. Write its code.\n\n{doc}",
)


@dataclass(frozen=True)
class Snippet:
    module: str
    owner: str | None  # enclosing class name for methods
    node: ast.FunctionDef | ast.AsyncFunctionDef
    doc: str
    code: str


def stdlib_files(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(module name, path)`` for the stdlib's Python files, in sorted order."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            yield ".".join(parts), path


def parse(path: Path) -> tuple[str, ast.Module] | None:
    """Read a file honouring its encoding cookie; ``None`` if it does not parse with this Python."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        # Old stdlib code triggers invalid-escape warnings that are noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return source, ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def is_public(name: str) -> bool:
    return name == "__init__" or not name.startswith("_")


def is_trivial(body: list[ast.stmt]) -> bool:
    """True for bodies that are empty, ``pass``, ``...`` or ``raise NotImplementedError``."""
    if not body:
        return True
    if len(body) > 1:
        return False
    stmt = body[0]
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is ...:
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def strip_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """Return the dedented ``def`` and body without the docstring, or ``None`` if that is not clean.

    Works on whole source lines: ``ast.get_source_segment`` re-splits the entire file on every call,
    which is quadratic on big modules. The only difference is that a trailing comment is kept.
    """
    doc_stmt = node.body[0]
    rest = node.body[1:]
    # Docstrings sharing a line with the signature or the next statement cannot be cut out by lines.
    if doc_stmt.lineno == node.lineno or (rest and rest[0].lineno <= doc_stmt.end_lineno):
        return None
    segment = lines[node.lineno - 1 : node.end_lineno]
    if segment[0].encode()[: node.col_offset].strip():  # e.g. ``class A: def f(self): ...``
        return None
    start, end = doc_stmt.lineno - node.lineno, doc_stmt.end_lineno - node.lineno + 1
    # Also drop the blank lines that usually separate the docstring from the code.
    while end < len(segment) and not segment[end].strip():
        end += 1
    code = textwrap.dedent("\n".join(segment[:start] + segment[end:]))
    # A multi-line string at column 0 defeats dedent; such code would not be valid on its own.
    if code[:1].isspace():
        return None
    return code.rstrip() + "\n"


def snippets(module: str, source: str, tree: ast.Module) -> Iterator[Snippet]:
    """Yield documented, non-trivial public functions and methods of one module."""
    # tokenize.open() translated all newlines to "\n", so this split matches ast's line numbers.
    lines = source.split("\n")
    candidates: list[tuple[str | None, ast.stmt]] = [(None, stmt) for stmt in tree.body]
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef) and is_public(stmt.name):
            candidates.extend((stmt.name, item) for item in stmt.body)
    for owner, node in candidates:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not is_public(node.name):
            continue
        raw_doc = ast.get_docstring(node, clean=False)
        if raw_doc is None:
            continue
        doc = inspect.cleandoc(raw_doc)
        if not DOC_MIN_CHARS <= len(doc) <= DOC_MAX_CHARS or is_trivial(node.body[1:]):
            continue
        code = strip_docstring(lines, node)
        if code is not None and len(code) <= MAX_OUTPUT_CHARS:
            yield Snippet(module, owner, node, doc, code)


def signature(snippet: Snippet) -> str:
    """``name(a, b, *args, **kw)``, without ``self``/``cls`` for methods and without defaults."""
    args = snippet.node.args
    names = [a.arg for a in args.posonlyargs + args.args]
    is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in snippet.node.decorator_list)
    if snippet.owner is not None and not is_static:
        names = names[1:]
    if args.vararg is not None:
        names.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        names.append("*")
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg is not None:
        names.append("**" + args.kwarg.arg)
    name = snippet.node.name if snippet.owner is None else f"{snippet.owner}.{snippet.node.name}"
    return f"{name}({', '.join(names)})"


def to_record(snippet: Snippet, rng: random.Random) -> dict[str, str]:
    template = rng.choice(TEMPLATES)
    kind = "function" if snippet.owner is None else "method"
    instruction = template.format(kind=kind, sig=signature(snippet), module=snippet.module, doc=snippet.doc)
    return {"instruction": instruction, "input": "", "output": snippet.code}


def collect_records(stdlib: Path) -> list[dict[str, str]]:
    """All unique-output records, shuffled deterministically and cut to ``NUM_RECORDS``."""
    unique: dict[str, Snippet] = {}
    for module, path in stdlib_files(stdlib):
        parsed = parse(path)
        if parsed is not None:
            for snippet in snippets(module, *parsed):
                unique.setdefault(snippet.code, snippet)
    rng = random.Random(SEED)
    chosen = list(unique.values())
    rng.shuffle(chosen)
    return [to_record(s, rng) for s in chosen[:NUM_RECORDS]]


def write_dataset(records: list[dict[str, str]]) -> int:
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    data = text.encode("utf-8")
    if len(data) > MAX_DATA_BYTES:
        raise SystemExit(f"dataset is {len(data)} bytes, over the {MAX_DATA_BYTES} budget; lower NUM_RECORDS")
    DATA_FILE.write_bytes(data)
    return len(data)


def write_readme(num_records: int, num_bytes: int) -> None:
    version = sys.version.split()[0]
    readme = f"""\
# Embedded default dataset

`python_stdlib_functions.jsonl` holds {num_records} alpaca-style records
(`instruction`, `input`, `output`; {num_bytes} bytes of JSON lines, UTF-8).

Source: documented public functions and methods of CPython {version}'s standard library
(PSF License Agreement, see https://docs.python.org/3/license.html). Each `instruction` wraps a
function's docstring in a short request; `output` is that function's source with the docstring and
decorators removed. Test suites, `idlelib`, `lib2to3`, `turtledemo` and `ensurepip` are excluded.

Rebuild (also retrains `../tokenizer`) with:

    python -m lamelm_fast.assets.build

The result is byte-identical across runs with the same Python version; another version yields
different records.
"""
    (DATA_FILE.parent / "README.md").write_text(readme, encoding="utf-8")


def record_text(record: dict[str, str]) -> str:
    return record["instruction"] + "\n" + record["output"]


def train_tokenizer(records: list[dict[str, str]]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # Seed all 256 byte symbols so any text encodes, not just what the dataset happens to contain.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(map(record_text, records), trainer=trainer, length=len(records))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer) -> None:
    """Write the files ``AutoTokenizer.from_pretrained`` needs, without importing transformers.

    Written by hand rather than via ``save_pretrained`` so the config stays minimal and stable across
    transformers versions. transformers 5 reads the chat template from ``chat_template.jinja``.
    """
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(TOKENIZER_DIR / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
    }
    config_text = json.dumps(config, indent=2) + "\n"
    (TOKENIZER_DIR / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    (TOKENIZER_DIR / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def token_stats(tokenizer: Tokenizer, records: list[dict[str, str]]) -> str:
    lengths = sorted(len(e.ids) for e in tokenizer.encode_batch(list(map(record_text, records))))

    def pct(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(p * len(lengths)))]

    mean = sum(lengths) / len(lengths)
    percentiles = ", ".join(f"p{round(p * 100)} {pct(p)}" for p in (0.5, 0.9, 0.99))
    return f"tokens/record (instruction + output) mean {mean:.1f}, {percentiles}, max {lengths[-1]}"


def main() -> None:
    records = collect_records(Path(sysconfig.get_paths()["stdlib"]))
    num_bytes = write_dataset(records)
    write_readme(len(records), num_bytes)
    tokenizer = train_tokenizer(records)
    save_tokenizer(tokenizer)
    print(f"{len(records)} records, {num_bytes} bytes -> {DATA_FILE}")
    print(f"tokenizer ({tokenizer.get_vocab_size()} tokens) -> {TOKENIZER_DIR}")
    print(token_stats(tokenizer, records))


if __name__ == "__main__":
    main()
