"""Shared fixtures: a tiny Llama saved as a local HF model directory, and small real datasets."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from datetime import datetime, tzinfo
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be set before triton is
# imported; the ops still pick the torch reference on CPU unless a test asks for the Triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _list_each_language_module_once() -> None:
    """Triton's interpreter patches triton.language at each kernel launch and again at every call of a @triton.jit
    helper inside a kernel (each program instance's), and each time lists every member of four modules and classes
    with inspect.getmembers: ~0.17 ms a call, nearly a third of test_cross_entropy.py's time. Here each one's
    member names are listed once; which members are builtins (and so patched) is still decided at every call, from
    their current values, as Triton's own ``_patch_builtin`` decides it: the same patches, so the same kernels run."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        import inspect

        from triton.runtime import interpreter
    except ImportError:
        return

    def parameters(name: str) -> list[str] | None:
        function = getattr(interpreter, name, None)
        return list(inspect.signature(function).parameters) if callable(function) else None

    if (parameters("_patch_builtin") != ["pkg", "builder", "scope"]
            or parameters("_patch_attr") != ["obj", "name", "member", "builder", "scope"]):
        return  # another Triton's interpreter: its own code runs
    patch_attr, is_builtin = interpreter._patch_attr, interpreter.tl.core.is_builtin
    names: dict[object, list[str]] = {}

    def patch_builtin(pkg, builder, scope) -> None:
        if pkg not in names:
            names[pkg] = [name for name, _ in inspect.getmembers(pkg)]
        for name in names[pkg]:
            member = getattr(pkg, name, None)
            if is_builtin(member):
                patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = patch_builtin


_list_each_language_module_once()


def tiny_llama_config(vocab_size: int, **overrides: object):
    from transformers import LlamaConfig

    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_model(family: str) -> torch.nn.Module:
    """A seeded 2-layer model of ``family`` (llama, qwen3, gemma3) with grouped-query attention and 97 tokens."""
    torch.manual_seed(0)
    if family == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(tiny_llama_config(97))
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, max_position_embeddings=512, tie_word_embeddings=False,
                  use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(**common))
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**common, query_pre_attn_scalar=24, sliding_window=8))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny tensors: on a busy CPU the thread barriers cost ~1000x the math."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in float64: ||actual - expected|| / ||expected||."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def model_loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A causal LM's loss on ``ids`` (as labels too) and every parameter gradient it produced."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(result: tuple[torch.Tensor, dict[str, torch.Tensor]],
                         reference: tuple[torch.Tensor, dict[str, torch.Tensor]], *, exact: bool,
                         loss_rtol: float = 1e-6, grad_rtol: float = 1e-5) -> None:
    """Two :func:`model_loss_and_grads` results agree: bit for bit when ``exact`` (the same ops ran), else within the
    relative errors given (a fused kernel rounds differently)."""
    (loss, grads), (want_loss, want_grads) = result, reference
    assert grads.keys() == want_grads.keys() and grads
    if exact:
        assert torch.equal(loss, want_loss)
        for name in grads:
            assert torch.equal(grads[name], want_grads[name]), name
    else:
        assert rel_err(loss, want_loss) < loss_rtol
        for name in grads:
            assert rel_err(grads[name], want_grads[name]) < grad_rtol, name


def lora_with_random_b(model: torch.nn.Module, target_modules: list[str], r: int = 4):
    """``model`` under a PEFT LoRA adapter whose B matrices are random (PEFT starts them at zero, which would zero
    every gradient of A and hide a wrong one)."""
    import peft

    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules))
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return wrapped


def count_calls(monkeypatch: pytest.MonkeyPatch, module: object, functions: dict[str, str]) -> dict[str, int]:
    """Wraps ``module``'s functions (label -> attribute name) to count their calls; returns the live counts."""
    counts = dict.fromkeys(functions, 0)

    def counting(label: str, function):
        def counted(*args, **kwargs):
            counts[label] += 1
            return function(*args, **kwargs)
        return counted

    for label, attr in functions.items():
        monkeypatch.setattr(module, attr, counting(label, getattr(module, attr)))
    return counts


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of each 4-bit matmul strategy's launch function (fused Triton GEMM, dequantize + cuBLAS)."""
    from lamelm_fast.kernels import nf4_lora

    return count_calls(monkeypatch, nf4_lora, {"fused": "matmul_4bit_lora", "dequant": "dequant_matmul_4bit_lora"})


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from lamelm_fast.train.config import TrainConfig
    from lamelm_fast.train.model import load_tokenizer

    return load_tokenizer(TrainConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer) -> Path:
    """A randomly initialised 2-layer Llama with the embedded tokenizer, saved with save_pretrained."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(embedded_tokenizer))).save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded_default_cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """`make train` in small, once per session: the embedded default (no --model, no --dataset) from the CLI in a
    fresh interpreter, its own recipe shortened to 60 steps, evaluated every 20. test_config.py checks what it says and
    that it learned, test_reporting.py that it wrote every file and no false alarm; the run directory is theirs to
    read, not to change."""
    cwd = tmp_path_factory.mktemp("embedded-default")
    result = subprocess.run([sys.executable, "-m", "lamelm_fast.train", "--max-steps", "60", "--logging-steps", "5",
                             "--eval-steps", "20", "--output-dir", "run"], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    return result, cwd / "run"


def embedded_records(count: int, max_chars: int = 400) -> list[dict]:
    """The first ``count`` short records of the shipped stdlib instruction set (real text)."""
    from lamelm_fast.train.data import embedded_dataset_path

    records = []
    with embedded_dataset_path().open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if len(record["instruction"]) + len(record["output"]) <= max_chars:
                records.append(record)
                if len(records) == count:
                    break
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def small_alpaca(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", embedded_records(48))


def chat_records(count: int) -> list[dict]:
    """``count`` one-question conversations (chat format) from :func:`embedded_records`."""
    return [{"messages": [{"role": "user", "content": record["instruction"]},
                          {"role": "assistant", "content": record["output"]}]} for record in embedded_records(count)]


def set_clock(monkeypatch: pytest.MonkeyPatch, moment: datetime) -> None:
    """The clock a chat template's strftime_now reads in transformers set to ``moment`` (what day the run is on)."""
    from transformers.utils import chat_template_utils

    class Clock(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:
            return moment

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)


def as_saved_by_an_older_version(checkpoint: Path, *entries: str) -> None:
    """Remove training-state entries that an older version did not save, and re-list the files as a save does."""
    from lamelm_fast.train import checkpoint as checkpoint_module

    state = torch.load(checkpoint / checkpoint_module.STATE_FILE, weights_only=False)
    for entry in entries:
        del state[entry]
    torch.save(state, checkpoint / checkpoint_module.STATE_FILE)
    (checkpoint / checkpoint_module.MANIFEST_FILE).unlink()  # re-listed without itself, as a save writes it
    checkpoint_module._write_manifest(checkpoint)


# `python -m lamelm_fast.train ARGS` (or `python -c SCRIPT ARGS`) in a child forked from one interpreter that has
# already imported what the CLI imports before it reads its flags (lamelm_fast.train.cli.main's imports: torch,
# transformers... ~4 s of each fresh process on 2 cores). Each child then runs as that command would, from a fresh argv,
# working directory and stdin (/dev/null), in a session of its own if asked, its stdout and stderr in files (or FIFOs)
# of its own; its exit code is the process's. What the imports printed (a fresh process prints it first) comes with
# every result. The server has the environment of the tests (set above) or the one given, as subprocess.run would.
CLI_SERVER = r"""
import atexit, json, os, runpy, sys, threading

protocol = os.fdopen(os.dup(1), "w")  # the answers; the imports' own output goes to the files given
for fd, path in ((1, sys.argv[1]), (2, sys.argv[2])):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
from lamelm_fast.train import cli, faults, loop  # noqa: F401  (what cli.main imports first)
sys.stdout.flush()
sys.stderr.flush()
protocol.write("ready\n")
protocol.flush()
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: runs as `python -m` / `python -c` would (an uncaught exception ends it as it ends those)
        protocol.close()
        for fd, name in ((1, "stdout"), (2, "stderr")):  # first (FIFOs: the tests wait to open them to read)
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        if request["new_session"]:
            os.setsid()
        os.chdir(request["cwd"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        try:
            if request["script"] is None:
                sys.argv = [sys.argv[0], *request["args"]]
                runpy.run_module("lamelm_fast.train", run_name="__main__", alter_sys=True)
            else:
                sys.argv = ["-c", *request["args"]]
                exec(compile(request["script"], "<string>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as exit_:  # how __main__ ends: sys.exit(main())
            code = exit_.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        # The rest of an interpreter's exit, less the teardown of its modules (~1.5 s on 2 cores, printing nothing):
        # non-daemon threads waited for, the exit handlers run, the streams flushed.
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    protocol.write(f"{pid}\n")
    protocol.flush()
    _, status = os.waitpid(pid, 0)
    protocol.write(f"{os.waitstatus_to_exitcode(status)}\n")
    protocol.flush()
"""


class ForkedCli:
    """Runs ``python -m lamelm_fast.train ARGS`` (:meth:`run`, :meth:`popen`) or ``python -c SCRIPT ARGS``
    (:meth:`popen`) as :data:`CLI_SERVER`'s forked children: a fresh process's exit code, stdout and stderr, without
    its ~4 s of imports. One command at a time."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.count = 0
        self.unfinished: ForkedProcess | None = None  # a popen child not yet waited for
        imports = [directory / "imports.stdout", directory / "imports.stderr"]
        self.server = subprocess.Popen([sys.executable, "-c", CLI_SERVER, *map(str, imports)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True,
                                       env={**(os.environ if env is None else env), "PYTHONSAFEPATH": "1"})
        assert self.answer(timeout=300) == "ready", "the CLI server did not start"
        self.imports_stdout, self.imports_stderr = (path.read_text() for path in imports)

    def answer(self, timeout: float) -> str:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        if not ready:
            self.server.kill()
            raise AssertionError(f"no answer from the CLI server in {timeout} s")
        return self.server.stdout.readline().strip()

    def _start(self, args: tuple[str, ...], cwd: Path | None, fifos: bool, script: str | None = None,
               new_session: bool = False) -> tuple[int, Path, Path]:
        if self.unfinished is not None:  # a test failed before its child's end: the child ended, and waited for
            self.unfinished.kill()
        self.count += 1
        out, err = (self.directory / f"{self.count}.{name}" for name in ("stdout", "stderr"))
        if fifos:
            os.mkfifo(out)
            os.mkfifo(err)
        request = {"args": list(args), "script": script, "cwd": str(cwd or Path.cwd()), "stdout": str(out),
                   "stderr": str(err), "new_session": new_session}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return int(self.answer(timeout=60)), out, err

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """``subprocess.run([python, -m, lamelm_fast.train, *args], capture_output=True, text=True)``."""
        _, out, err = self._start(args, cwd, fifos=False)
        returncode = int(self.answer(timeout))
        return subprocess.CompletedProcess(["python", "-m", "lamelm_fast.train", *args], returncode,
                                           self.imports_stdout + out.read_text(), self.imports_stderr + err.read_text())

    def popen(self, *args: str, script: str | None = None, cwd: Path | None = None,
              new_session: bool = False) -> ForkedProcess:
        """``subprocess.Popen([python, -m, lamelm_fast.train, *args] (or [python, -c, script, *args]), stdout=PIPE,
        stderr=PIPE, text=True, start_new_session=new_session)``, for what the tests use of it."""
        assert not self.imports_stdout, "the imports printed to stdout: a process's stream would start with it"
        pid, out, err = self._start(args, cwd, fifos=True, script=script, new_session=new_session)
        self.unfinished = ForkedProcess(self, pid, os.open(out, os.O_RDONLY), os.open(err, os.O_RDONLY), new_session)
        return self.unfinished

    def close(self) -> None:
        if self.unfinished is not None:
            self.unfinished.kill()
        self.server.stdin.close()
        self.server.wait(timeout=60)


class ForkedProcess:
    """A :meth:`ForkedCli.popen` child: ``pid``, ``stdout.readline()``, ``send_signal``, and ``communicate``, which (as
    Popen's) reads stdout and stderr till every process holding them has exited, then waits for the child."""

    def __init__(self, server: ForkedCli, pid: int, stdout: int, stderr: int, new_session: bool) -> None:
        self.server, self.pid, self.fds, self.new_session = server, pid, (stdout, stderr), new_session
        self.stdout = self  # readline() reads the stream unbuffered: what it leaves is communicate's
        self.returncode: int | None = None

    def kill(self) -> None:
        """SIGKILL (its process group too, in a session of its own), then wait for it."""
        import contextlib
        import signal

        with contextlib.suppress(ProcessLookupError):
            (os.killpg if self.new_session else os.kill)(self.pid, signal.SIGKILL)
        for fd in self.fds:
            with contextlib.suppress(OSError):  # (closed already by a communicate that timed out)
                os.close(fd)
        self.returncode = int(self.server.answer(timeout=60))
        self.server.unfinished = None

    def readline(self) -> str:
        line = bytearray()
        while not line.endswith(b"\n") and (byte := os.read(self.fds[0], 1)):
            line += byte
        return line.decode()

    def send_signal(self, signal_number: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal_number)

    def communicate(self, timeout: float) -> tuple[str, str]:
        import selectors
        import time

        deadline = time.monotonic() + timeout
        read: dict[int, bytearray] = {fd: bytearray() for fd in self.fds}
        with selectors.DefaultSelector() as selector:
            for fd in self.fds:
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                events = selector.select(deadline - time.monotonic())
                assert events, f"the process did not end in {timeout} s"
                for key, _ in events:
                    try:
                        data = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if data:
                        read[key.fd] += data
                    else:  # end of file: every process holding it has closed it
                        selector.unregister(key.fd)
        for fd in self.fds:
            os.close(fd)
        self.returncode = int(self.server.answer(max(1.0, deadline - time.monotonic())))
        self.server.unfinished = None
        stdout, stderr = (read[fd].decode() for fd in self.fds)
        return stdout, self.server.imports_stderr + stderr


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory):
    """:class:`ForkedCli`, started once per session."""
    forked = ForkedCli(tmp_path_factory.mktemp("cli"))
    yield forked
    forked.close()
