"""What the model says at each evaluation: greedy completions of held-out prompts beside their reference answers.

A loss curve says how far the model is from the data, not what it does with a prompt; a few completions logged
step after step show that (and catch a model that learned to stop at once, or to repeat itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lamelm_fast import patching
from lamelm_fast.train.data import Example

NEW_TOKENS = 64  # per completion, and the length of the reference shown beside it
TEXT_PROMPT_TOKENS = 32  # a plain-text example (every token a target) is continued from its first tokens


def prompt_and_reference(example: Example) -> tuple[list[int], list[int]]:
    """The tokens before the first response token (the prompt; under --train-on-prompt the example records where that
    is) and the first NEW_TOKENS tokens after them; a plain-text example is split after its first TEXT_PROMPT_TOKENS
    tokens (at most half of it)."""
    ids = example.input_ids.tolist()
    first_target = example.prompt_length or next((i for i, flag in enumerate(example.target_mask) if flag and i > 0),
                                                 len(ids))
    if first_target <= 1:  # no prompt part
        first_target = max(1, min(TEXT_PROMPT_TOKENS, len(ids) // 2))
    return ids[:first_target], ids[first_target:first_target + NEW_TOKENS]


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int] | None:
    """Where a completion ends: the tokenizer's eos and every end token of the model's own generation config (a chat
    model's end of turn, e.g. Llama-3's ``<|eot_id|>``, is often only there)."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(own if isinstance(own, list) else [own])} - {None}
    return sorted(ids) or None


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # layers compiled by --compile would recompile layer by layer for a KV cache
def generate_samples(model: nn.Module, examples: list[Example], tokenizer: Any,
                     autocast_dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """One row per example: the prompt, the model's greedy completion and the reference, as text."""
    from transformers import GenerationConfig

    causal_lm = patching.causal_lm(model)  # a PEFT model's adapters are in its modules: they take part
    device = next(causal_lm.parameters()).device
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(causal_lm, tokenizer))
    was_training = causal_lm.training
    causal_lm.eval()
    rows = []
    try:
        for index, example in enumerate(examples):
            prompt, reference = prompt_and_reference(example)
            ids = torch.tensor([prompt], device=device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = causal_lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            rows.append({"index": index, "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                         "completion": tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True),
                         "reference": tokenizer.decode(reference, skip_special_tokens=True)})
    finally:
        causal_lm.train(was_training)
    return rows
