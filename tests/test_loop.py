"""The loop on a tiny Llama: packing, gradient accumulation, exact resume, PEFT-loadable adapters."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import embedded_records, tiny_llama_config, write_jsonl
from lamelm_fast.train import TrainConfig, train
from lamelm_fast.train.config import ConfigError
from lamelm_fast.train.data import Batch, Record, collate, encode_record, iterate_batches, prepare_datasets
from lamelm_fast.train.model import keep_bnb_storage_layout


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_each_sequence_its_own_loss(attn: str, embedded_tokenizer) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(len(embedded_tokenizer))
    config._attn_implementation = attn
    model = LlamaForCausalLM(config).eval()
    examples = [encode_record(Record(r, "x"), "alpaca", embedded_tokenizer, False) for r in embedded_records(4)]

    def per_token_losses(batch) -> torch.Tensor:
        hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             use_cache=False).last_hidden_state
        return F.cross_entropy(model.lm_head(hidden).flatten(0, 1), batch.labels.flatten(), reduction="none")

    packed = per_token_losses(collate(examples, packing=True, pad_token_id=0))
    start = 0
    for example in examples:
        alone = per_token_losses(collate([example], packing=True, pad_token_id=0))
        n = len(example.input_ids)
        torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-6)
        start += n


def base_config(tmp_path: Path, model_dir: Path, dataset: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), dataset=str(dataset), finetune="full", learning_rate=1e-3,
                  max_seq_length=128, eval_split_ratio=0.0, logging_steps=1, output_dir=str(tmp_path / "run"),
                  quiet=True, seed=5)
    values.update(overrides)
    return TrainConfig(**values)


def train_rows(result) -> list[dict]:
    return [row for row in result.history if row["type"] == "train"]


@pytest.mark.parametrize("packing", [True, False])
def test_gradient_accumulation_split_is_invisible(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path,
                                                  packing: bool) -> None:
    whole = train(base_config(tmp_path / "a", tiny_model_dir, small_alpaca, per_device_train_batch_size=8,
                              gradient_accumulation_steps=1, max_steps=4, packing=packing))
    split = train(base_config(tmp_path / "b", tiny_model_dir, small_alpaca, per_device_train_batch_size=2,
                              gradient_accumulation_steps=4, max_steps=4, packing=packing))
    for a, b in zip(train_rows(whole), train_rows(split), strict=True):
        assert rel(b["loss"], a["loss"]) < 1e-5 and rel(b["grad_norm"], a["grad_norm"]) < 1e-4
        assert b["learning_rate"] == a["learning_rate"]
    assert train_rows(whole)[-1]["loss"] < train_rows(whole)[0]["loss"]


def test_resume_equals_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path) -> None:
    # LoRA dropout > 0 and shuffling across 3 epochs: RNG and data position must both be restored.
    settings = dict(finetune="lora", lora_dropout=0.2, learning_rate=5e-3, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, max_steps=15, save_steps=5, shuffle=True)
    full = train(base_config(tmp_path / "full", tiny_model_dir, small_alpaca, **settings))
    part_dir = tmp_path / "part" / "run"
    shutil.copytree(full.run_dir / "checkpoint-5", part_dir / "checkpoint-5")
    resumed = train(base_config(tmp_path / "part", tiny_model_dir, small_alpaca, resume_from_checkpoint="latest",
                                **settings))
    expected = {row["step"]: row for row in train_rows(full)}
    assert [row["step"] for row in train_rows(resumed)] == list(range(1, 16))  # steps 1-5: carried by checkpoint-5
    for row in train_rows(resumed):
        assert rel(row["loss"], expected[row["step"]]["loss"]) < 1e-6
        assert rel(row["grad_norm"], expected[row["step"]]["grad_norm"]) < 1e-5
    from safetensors.torch import load_file

    final_full = load_file(str(full.run_dir / "checkpoint-15" / "adapter_model.safetensors"))
    final_resumed = load_file(str(resumed.run_dir / "checkpoint-15" / "adapter_model.safetensors"))
    assert final_full.keys() == final_resumed.keys()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=1e-5, atol=1e-7)


def test_save_total_limit_keeps_the_newest(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path) -> None:
    result = train(base_config(tmp_path, tiny_model_dir, small_alpaca, max_steps=6, save_steps=2,
                               save_total_limit=2, per_device_train_batch_size=4))
    assert sorted(p.name for p in result.run_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(result.run_dir.glob(".checkpoint-*"))  # no temporary directories left behind
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_loss"] < summary["first_loss"]


def hf_mean_loss(model, examples, tokenizer) -> float:
    """Mean target-token loss computed by the HF model's own forward (padding, unshifted labels)."""
    total, count = 0.0, 0
    with torch.no_grad():
        batches = iterate_batches(examples, 4, packing=False, pad_token_id=tokenizer.pad_token_id)
        for start, batch in zip(range(0, len(examples), 4), batches, strict=True):
            labels = torch.full_like(batch.input_ids, -100)
            labels[:, 1:] = batch.labels[:, :-1]  # HF shifts inside its loss
            lengths = torch.tensor([len(e.input_ids) for e in examples[start:start + 4]])
            padding_mask = (torch.arange(batch.input_ids.shape[1]) < lengths[:, None]).long()
            out = model(input_ids=batch.input_ids, attention_mask=padding_mask, labels=labels,
                        num_items_in_batch=torch.tensor(1))
            total += out.loss.item()
            count += batch.num_targets
    return total / count


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_saved_adapter_loads_in_peft_and_reproduces_val_loss(tmp_path: Path, tiny_model_dir: Path, finetune: str,
                                                             request: pytest.FixtureRequest) -> None:
    """QLoRA goes through the CLI exactly as a user types it (run by conftest's ForkedCli): bitsandbytes 4-bit on the
    CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dataset = write_jsonl(tmp_path / "d.jsonl", embedded_records(40))
    settings = dict(finetune=finetune, max_steps=10, learning_rate=1e-2, eval_split_ratio=0.2,
                    per_device_train_batch_size=4, lora_dropout=0.0)
    config = base_config(tmp_path, tiny_model_dir, dataset, **settings)
    if finetune == "qlora":
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
        completed = request.getfixturevalue("cli").run(  # conftest's ForkedCli
            "--model", str(tiny_model_dir), "--dataset", str(dataset), "--max-seq-length", "128", "--output-dir",
            config.output_dir, "--seed", "5", *flags, timeout=600)
        assert completed.returncode == 0, completed.stderr
        assert "QLoRA: NF4 + double quantization, float32 compute" in completed.stdout
        assert "fused 4-bit LoRA kernels on 14 layers" in completed.stdout  # 2 layers x 7 projections
        history = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
        adapter = Path(config.output_dir) / "checkpoint-10"
    else:
        result = train(config)
        history, adapter = result.history, result.checkpoint
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    quantization = None
    if finetune == "qlora":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization,
                                                device_map="cpu" if quantization else None)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    keep_bnb_storage_layout(peft_model)  # bitsandbytes' own CPU repack fails on this model's 96-wide layers
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    _, held_out, _ = prepare_datasets(str(dataset), "train", "auto", tokenizer, 128, False, 0.2, config.seed)
    ours = [row for row in history if row["type"] == "eval"][-1]["val_loss"]
    assert rel(hf_mean_loss(peft_model, held_out, tokenizer), ours) < 1e-4
    with peft_model.disable_adapter():
        assert hf_mean_loss(peft_model, held_out, tokenizer) > ours + 0.1  # the adapter learned something


def test_gradient_checkpointing_and_bf16(tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path) -> None:
    settings = dict(max_steps=3, per_device_train_batch_size=4)
    plain = train_rows(train(base_config(tmp_path / "a", tiny_model_dir, small_alpaca, **settings)))
    checkpointed = train_rows(train(base_config(tmp_path / "b", tiny_model_dir, small_alpaca,
                                                gradient_checkpointing=True, **settings)))
    bf16 = train_rows(train(base_config(tmp_path / "c", tiny_model_dir, small_alpaca, bf16=True, **settings)))
    for a, b, c in zip(plain, checkpointed, bf16, strict=True):
        assert rel(b["loss"], a["loss"]) < 1e-5  # recomputation changes memory, not numbers
        assert rel(c["loss"], a["loss"]) < 2e-2 and c["loss"] != a["loss"]  # bf16 autocast really ran


def test_bf16_weights_keep_fp32_masters_that_resume_exactly(tmp_path: Path, tiny_model_dir: Path,
                                                            small_alpaca: Path) -> None:
    from safetensors.torch import load_file

    settings = dict(max_steps=8, per_device_train_batch_size=4, bf16=True, save_steps=4)
    autocast = train(base_config(tmp_path / "a", tiny_model_dir, small_alpaca, **settings))
    whole = train(base_config(tmp_path / "b", tiny_model_dir, small_alpaca, bf16_weights=True, **settings))
    for a, b in zip(train_rows(autocast), train_rows(whole), strict=True):
        assert rel(b["loss"], a["loss"]) < 2e-2  # the same training, rounded at other places
    assert train_rows(whole)[-1]["loss"] < train_rows(whole)[0]["loss"]
    weights = load_file(str(whole.run_dir / "checkpoint-8" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    state = torch.load(whole.run_dir / "checkpoint-4" / "training_state.pt", weights_only=False)["optimizer"]["state"]
    assert state and all(s["master_param"].dtype == torch.float32 for s in state.values())

    # The masters are what resumes: fresh copies of the bf16 weights would lose the updates that rounding hid.
    part_dir = tmp_path / "c" / "run"
    shutil.copytree(whole.run_dir / "checkpoint-4", part_dir / "checkpoint-4")
    resumed = train(base_config(tmp_path / "c", tiny_model_dir, small_alpaca, bf16_weights=True,
                                resume_from_checkpoint="latest", **settings))
    expected = {row["step"]: row for row in train_rows(whole)}
    assert [row["step"] for row in train_rows(resumed)] == list(range(1, 9))  # steps 1-4: carried by checkpoint-4
    for row in train_rows(resumed):
        assert row["loss"] == expected[row["step"]]["loss"]


def test_bf16_weights_are_refused_outside_full_bf16_training(tiny_model_dir: Path, small_alpaca: Path,
                                                             tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="add --bf16"):
        train(base_config(tmp_path, tiny_model_dir, small_alpaca, bf16_weights=True))
    with pytest.raises(ConfigError, match="--bf16-weights is for --finetune full"):
        train(base_config(tmp_path, tiny_model_dir, small_alpaca, bf16=True, bf16_weights=True, finetune="lora"))


class SyncCounter(TorchDispatchMode):
    """Counts device-to-host reads (.item(), bool(tensor), ...: all dispatch to _local_scalar_dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def training_step(model_dir: Path, tokenizer: Any, packing: bool, device: torch.device,
                  autocast_dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Batch, Callable[[], None]]:
    """A patched model, a batch of embedded records (padded rows do have padding), its optimizer and schedule on
    ``device``, and one training step over them as a function: loss, backward, the window's sums, the optimizer and
    scheduler steps."""
    from transformers import AutoModelForCausalLM

    from lamelm_fast import apply_kernels
    from lamelm_fast.optim import get_lr_scheduler
    from lamelm_fast.train.loop import WindowMetrics, make_optimizer
    from lamelm_fast.train.model import causal_lm_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    apply_kernels(model)
    examples = [encode_record(Record(r, "x"), "alpaca", tokenizer, False) for r in embedded_records(4)]
    batch = collate(examples, packing=packing, pad_token_id=0)
    assert len({len(e.input_ids) for e in examples}) > 1
    batch = batch.to(device)
    config = TrainConfig(learning_rate=1e-3, weight_decay=0.1, max_grad_norm=1.0)
    optimizer = make_optimizer(model, config)
    scheduler = get_lr_scheduler("cosine", optimizer, 2, 10)
    window = WindowMetrics(device)

    def step() -> None:
        loss, correct = causal_lm_loss(model, batch, batch.num_targets, autocast_dtype)
        loss.backward()
        window.add_micro_batch(loss, correct, batch)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return model, batch, step


@pytest.mark.parametrize("packing", [True, False])
def test_training_step_reads_nothing_on_the_host(packing: bool, tiny_model_dir: Path, embedded_tokenizer) -> None:
    """No device-to-host read in a training step, transformers' mask code included: packed rows are known packed
    (no check of the positions), padded rows need no padding mask (no check of the mask)."""
    model, batch, step = training_step(tiny_model_dir, embedded_tokenizer, packing, torch.device("cpu"))
    with SyncCounter() as counted:
        step()
    assert counted.count == 0
    with SyncCounter() as unsaid:  # given positions but no padding-free arguments, transformers checks them
        model.model(input_ids=batch.input_ids, position_ids=torch.arange(batch.input_ids.shape[1])[None])
    assert unsaid.count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packing", [True, False])
def test_training_step_on_cuda_makes_no_synchronizing_call(packing: bool, tiny_model_dir: Path,
                                                           embedded_tokenizer) -> None:
    """The test above by CUDA's own detector, on the GPU path: Triton layers, varlen flash attention for packed rows,
    the fused loss and the Triton optimizer under bf16 autocast. The step after the first (which compiles, autotunes
    and uploads the optimizer's tables) must make no synchronizing call."""
    _, _, step = training_step(tiny_model_dir, embedded_tokenizer, packing, torch.device("cuda"), torch.bfloat16)
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_lora_target_modules_all_linear_and_a_wrong_name(tiny_model_dir: Path, small_alpaca: Path,
                                                         tmp_path: Path) -> None:
    from lamelm_fast.train.config import resolve
    from lamelm_fast.train.model import load_model, load_model_config

    config = resolve(base_config(tmp_path, tiny_model_dir, small_alpaca, finetune="lora",
                                 lora_target_modules=["all-linear"]))
    model = load_model(config, load_model_config(config), torch.device("cpu")).model
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    wrong = dataclasses.replace(config, lora_target_modules=["qkv"])
    with pytest.raises(ConfigError, match="this model's linear layers are down_proj,gate_proj,k_proj,o_proj,q_proj,"
                                          "up_proj,v_proj"):
        load_model(wrong, load_model_config(wrong), torch.device("cpu"))


def test_qlora_on_the_embedded_model_is_4_bit() -> None:
    """``--finetune qlora`` without ``--model`` quantizes the embedded model's (random) weights, as the banner says,
    instead of training LoRA over a dense base."""
    from bitsandbytes.nn import Linear4bit

    from lamelm_fast.train.config import resolve
    from lamelm_fast.train.model import load_model, load_model_config

    config = resolve(TrainConfig(finetune="qlora"))
    loaded = load_model(config, load_model_config(config), torch.device("cpu"))
    layers = loaded.model.get_base_model().model.layers
    bases = [module.get_base_layer() for layer in layers for module in layer.modules() if hasattr(module, "lora_A")]
    assert len(bases) == 7 * len(layers) and all(isinstance(base, Linear4bit) for base in bases)
    assert bases[0].weight.quant_state.quant_type == "nf4"
    assert f"fused 4-bit LoRA kernels on {len(bases)} layers" in loaded.notes



def test_one_run_at_a_time_per_process_and_progress_bars_restored(tmp_path: Path, tiny_model_dir: Path,
                                                                  small_alpaca: Path) -> None:
    """A second train() while one runs in another thread is refused (the two would share the kernel backend and the
    random number generator: a QLoRA pair crashed, a full pair changed each other's losses); after a run,
    transformers' progress bars are back on."""
    import threading

    from transformers.utils import logging as transformers_logging

    from lamelm_fast.train import loop

    assert transformers_logging.is_progress_bar_enabled()
    inside, release, errors = threading.Event(), threading.Event(), []
    load_model = loop.load_model

    def held_load(*args, **kwargs):
        inside.set()
        release.wait(60)
        return load_model(*args, **kwargs)

    loop.load_model = held_load
    try:
        first = threading.Thread(target=lambda: train(base_config(tmp_path / "a", tiny_model_dir, small_alpaca,
                                                                  max_steps=1)))
        first.start()
        assert inside.wait(60)
        try:
            train(base_config(tmp_path / "b", tiny_model_dir, small_alpaca, max_steps=1))
        except RuntimeError as error:
            errors.append(str(error))
        release.set()
        first.join(120)
    finally:
        loop.load_model = load_model
    assert len(errors) == 1 and errors[0].startswith("train() is running in another thread of this process")
    assert not (tmp_path / "b" / "run").exists()
    assert transformers_logging.is_progress_bar_enabled()
