"""Padding-free attention for packed batches: varlen flash attention over the concatenated sequences.

A packed row (sequences concatenated, positions restarting) reaches transformers' sdpa attention with a block-diagonal
causal mask. sdpa cannot give a dense mask to its flash kernel, so it runs the memory-efficient kernel over the whole
row: (sum of L_i)^2 scores per head, the mask read for every one of them, and on CUDA the grouped k/v repeated to the
query heads. Varlen flash attention computes only the causal half of each sequence's own square, sum of L_i^2 / 2:
for a row of n equal sequences ~2n times less work, and no mask.

:func:`patch_varlen_attention` wraps transformers' ``"sdpa"`` attention function once per process. The wrapper takes
the varlen path only for the attention modules of a model :func:`mark_padding_free_forwards` marked (``apply_kernels``
does, for the families it knows: every other model's calls are transformers' sdpa, as in a process that never
imported lamelm_fast), when the caller passes transformers' padding-free keyword arguments (``cu_seq_lens_q``,
``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``: our loop does for packed batches, as HF's
``DataCollatorWithFlattening`` does) and flash attention can run them (CUDA on sm80+, bf16/fp16, head size a multiple
of 8 up to 256, causal, no dropout, softcap, position bias or paged cache, no sliding window shorter than the longest
sequence). Every other call is transformers' sdpa, unchanged.

:func:`mark_padding_free_forwards` marks a model's decoder, whose forward then does two things for the masks made
inside it:

- It spares transformers a host read per forward: to tell a packed row from a plain one, transformers reads on the
  host whether the positions ever restart (a device sync on GPU). The caller's arguments already say: a forward
  given the padding-free arguments is packed, and one given no positions has the plain positions the model makes
  itself. Only a forward given positions and no padding-free arguments is checked as before.
- It defers the sdpa mask: a packed row's mask is [batch, 1, T, T] (256 MB at 16k tokens, 1 GB at 32k) and only the
  sdpa fallback reads it, so it is built the first time a layer falls back, once per forward, and never when every
  layer runs varlen. Only for families whose code hands the mask to the attention function untouched
  (lamelm_fast.patching.SUPPORTED_MODEL_TYPES): nothing but the wrapped sdpa may receive a :class:`DeferredMask`.

Under torch.compile the mark is not set (dynamo cannot trace a ContextVar): transformers checks packed rows itself,
without its host read while it traces, and the mask is built at once; the varlen path is unchanged.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lamelm_fast.ops._patch import mixed_in_class
from lamelm_fast.ops.dispatch import active_autocast_dtype

PADDING_FREE_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# torch's varlen flash attention (torch >= 2.10), and whether it takes ``enable_gqa`` (torch >= 2.12 asks for it when
# k/v have fewer heads; earlier releases pass them to the kernel, which supports it natively). Module constants, not
# a cached function: torch.compile traces the cache wrapper away, and the import with it.
try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:
    _varlen_attn = None
_VARLEN_TAKES_GQA = _varlen_attn is not None and "enable_gqa" in inspect.signature(_varlen_attn).parameters


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


@torch.compiler.assume_constant_result  # torch.compile asks while tracing (no CUDA query in the graph) and keeps it
def flash_device(device: torch.device) -> bool:
    """Whether torch's flash kernel runs on this device (a CUDA GPU of compute capability 8.0 or later)."""
    return _flash_capable(device)


def flash_runs(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether torch's flash kernel runs on this device in this dtype."""
    return dtype in (torch.bfloat16, torch.float16) and flash_device(device)


def attention_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype | None:
    """The dtype sdpa computes this call in: autocast's where autocast is on for the device, else the inputs' common
    dtype (None when they differ: sdpa refuses that)."""
    autocast = active_autocast_dtype(query.device)
    if autocast is not None:
        return autocast
    return query.dtype if query.dtype == key.dtype == value.dtype else None


def flash_varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                           cu_seq_lens_k: torch.Tensor, max_length_q: int, max_length_k: int, scale: float | None,
                           ) -> torch.Tensor:
    """Causal varlen attention over [tokens, heads, head_dim] inputs (k/v may have fewer heads)."""
    assert _varlen_attn is not None
    extra = {"enable_gqa": query.shape[1] != key.shape[1]} if _VARLEN_TAKES_GQA else {}
    return _varlen_attn(query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scale,
                       window_size=(-1, 0), **extra)


def _plain_causal_padding_free(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether this call of the sdpa attention function carries the padding-free arguments and is plain causal
    attention of each sequence on its own (what both padding-free paths compute)."""
    if any(kwargs.get(name) is None for name in PADDING_FREE_KWARGS):
        return False
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return False
    window = kwargs.get("sliding_window")
    causal = kwargs.get("is_causal") is not False and getattr(module, "is_causal", True)
    extras = ("softcap", "position_bias", "cache")  # what sdpa adds or consults beyond plain attention
    return (dropout == 0.0 and causal and all(kwargs.get(name) is None for name in extras)
            and (window is None or kwargs["max_length_k"] <= window))


def varlen_supported(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                     kwargs: dict[str, Any]) -> bool:
    """Whether :func:`flash_varlen_attention` can compute this call of the sdpa attention function."""
    if _varlen_attn is None or not flash_runs(query.device, attention_dtype(query, key, value)):
        return False
    head_dim = query.shape[-1]
    return head_dim % 8 == 0 and head_dim <= 256 and _plain_causal_padding_free(module, query, key, value, dropout,
                                                                                 kwargs)


def padded_supported(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                     kwargs: dict[str, Any]) -> bool:
    """Whether :func:`padded_causal_attention` computes this call: on CPU (where there is no varlen kernel; on a GPU
    without flash the masked sdpa stays, unmeasured against this), outside torch.compile (its gathers would be
    traced), queries and keys of the same sequences."""
    if query.device.type != "cpu" or torch.compiler.is_compiling() or attention_dtype(query, key, value) is None:
        return False
    if not _plain_causal_padding_free(module, query, key, value, dropout, kwargs):
        return False
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    return kwargs["max_length_q"] == kwargs["max_length_k"] and (cu_q is cu_k or torch.equal(cu_q, cu_k))


def padded_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                            max_length: int, scale: float | None) -> torch.Tensor:
    """:func:`flash_varlen_attention`'s contract ([tokens, heads, head_dim] in and out, k/v may have fewer heads,
    each sequence causal on its own) as one sdpa call over the sequences right-padded to the longest.

    A query never sees the keys after it, so the padding (copies of whatever tokens follow: finite, and their
    gradients are zero) needs no mask, and sdpa's causal kernel computes each sequence's own triangle, about
    ``len(seqs) * max_length^2 / 2`` scores per head, instead of the packed row's whole square through the
    block-diagonal mask (on CPU: ~8x fewer for the embedded model's rows of four ~150-token examples). Gathers by
    index only: no host read."""
    tokens, heads = query.shape[0], query.shape[1]
    starts = cu_seq_lens[:-1].long()
    offsets = torch.arange(max_length, device=query.device)
    index = (starts[:, None] + offsets).clamp_(max=tokens - 1)  # [sequences, max_length]

    def padded(tensor: torch.Tensor) -> torch.Tensor:  # [sequences, heads, max_length, head_dim]
        # index_select, not tensor[index]: its backward is index_add_, ~3x faster on CPU than indexing's index_put_
        rows = tensor.index_select(0, index.flatten())
        return rows.view(*index.shape, *tensor.shape[1:]).permute(0, 2, 1, 3)

    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), is_causal=True, scale=scale,
                                         enable_gqa=key.shape[1] != heads)
    # Each token's place in the padded output: its sequence's row, its offset in the sequence.
    token = torch.arange(tokens, device=query.device)
    sequence = torch.searchsorted(cu_seq_lens[1:].long(), token, right=True)
    place = sequence * max_length + token - starts[sequence]
    return out.permute(0, 2, 1, 3).reshape(-1, heads, out.shape[-1]).index_select(0, place)


class DeferredMask:
    """transformers' sdpa mask for one forward, built on first use and kept for the other layers."""

    def __init__(self, build: Callable[[], torch.Tensor | None]) -> None:
        self._build: Callable[[], torch.Tensor | None] | None = build
        self._mask: torch.Tensor | None = None

    def get(self) -> torch.Tensor | None:
        if self._build is not None:
            self._mask, self._build = self._build(), None
        return self._mask


# The rows of the marked decoder's forward running now, as its caller's arguments say: "packed", "plain" or
# "unsaid"; None outside a marked decoder's forward.
_PACKED_ROWS: contextvars.ContextVar[str | None] = contextvars.ContextVar("lamelm_packed_rows", default=None)


def _packed_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    if kwargs.get("cu_seq_lens_q") is not None:
        return "packed"
    if len(args) <= 1 and kwargs.get("position_ids") is None:  # input_ids alone may be positional
        return "plain"
    return "unsaid"


def _deferred(sdpa_mask: Callable[..., Any]) -> Callable[..., Any]:
    def mask(*args: Any, **kwargs: Any) -> Any:
        # A training-shaped call (no padding mask, no cache offset, keys = queries) whose mask transformers may not
        # skip, made inside a marked decoder's forward: a packed row. Generation's masks (a padding mask, a cache;
        # with a static cache made outside the model's forward and handed back to it) are built at once, as before.
        deferrable = (kwargs.get("attention_mask") is None and kwargs.get("allow_is_causal_skip") is False
                      and kwargs.get("q_offset") == 0 and kwargs.get("kv_length") == kwargs.get("q_length"))
        if not deferrable or torch.compiler.is_compiling() or _PACKED_ROWS.get() is None:
            return sdpa_mask(*args, **kwargs)
        return DeferredMask(functools.partial(sdpa_mask, *args, **kwargs))

    mask.lamelm_deferred = sdpa_mask  # type: ignore[attr-defined]
    return mask


class _PackedRowsDecoder:
    """Mixed in front of the decoder's class: its forward tells the mask code it calls whether its rows are packed.
    Set and reset in the forward's own frame, so each thread has its own, and any exception (KeyboardInterrupt
    included, which forward hooks do not see) resets it."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # dynamo cannot trace a ContextVar; see the module docstring
            return super().forward(*args, **kwargs)
        token = _PACKED_ROWS.set(_packed_rows(args, kwargs))
        try:
            return super().forward(*args, **kwargs)
        finally:
            _PACKED_ROWS.reset(token)


PADDING_FREE_MARK = "lamelm_padding_free"  # on the attention modules whose sdpa calls may take the padding-free paths


def mark_padding_free_forwards(decoder: nn.Module) -> None:
    """Mark the decoder (see the module docstring) and its attention modules, whose calls alone the wrapped sdpa may
    run padding-free: only of a family in lamelm_fast.patching.SUPPORTED_MODEL_TYPES; idempotent."""
    if not isinstance(decoder, _PackedRowsDecoder):
        decoder.__class__ = mixed_in_class(_PackedRowsDecoder, type(decoder), "PackedRows")
    for name, module in decoder.named_modules():
        if name.rsplit(".", 1)[-1] == "self_attn":
            setattr(module, PADDING_FREE_MARK, True)


def _packed_by_word(find: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[..., torch.Tensor | None]:
    def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
        rows = None if torch.compiler.is_compiling() else _PACKED_ROWS.get()
        if rows in (None, "unsaid"):
            return find(position_ids)
        if rows == "plain":
            return None
        # transformers' sequence index (a new sequence wherever the position does not follow the last one), without
        # its host check for "one sequence per row": a row that is one sequence gets the plain causal mask from it.
        first = position_ids[:, :1] - 1
        return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

    find_packed_sequence_indices.lamelm_packed_by_word = find  # type: ignore[attr-defined]
    return find_packed_sequence_indices


def _varlen_or_sdpa(sdpa: Callable[..., Any]) -> Callable[..., Any]:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
        # Only a marked model's attention (a family whose attention is plain causal, maybe windowed): another model's
        # padding-free call may mean more than its arguments say (Llama 4's chunks live in its mask alone).
        ours = getattr(module, PADDING_FREE_MARK, False)
        flash = ours and varlen_supported(module, query, key, value, dropout, kwargs)
        if not flash and not (ours and padded_supported(module, query, key, value, dropout, kwargs)):
            if isinstance(attention_mask, DeferredMask):
                attention_mask = attention_mask.get()
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        # transformers hands [batch, heads, seq, head_dim] views of [batch, seq, heads, head_dim] projections: the
        # transposes below are views again, and the packed tokens of every row are one run of sequences. The cast is
        # autocast's for sdpa (a no-op where the dtype is already right).
        batch, heads, seq, head_dim = query.shape
        dtype = attention_dtype(query, key, value)

        def tokens(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(dtype).transpose(1, 2).reshape(batch * seq, tensor.shape[1], tensor.shape[-1])

        if flash:
            out = flash_varlen_attention(tokens(query), tokens(key), tokens(value), kwargs["cu_seq_lens_q"],
                                         kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"],
                                         scaling)
        else:
            out = padded_causal_attention(tokens(query), tokens(key), tokens(value), kwargs["cu_seq_lens_q"],
                                          kwargs["max_length_q"], scaling)
        return out.view(batch, seq, heads, -1), None  # the layout transformers' attention functions return

    attention.lamelm_varlen_wrapped = sdpa  # type: ignore[attr-defined]
    return attention


def patch_varlen_attention() -> bool:
    """Wrap transformers' ``"sdpa"`` attention and mask functions and its packed-row check (see the module
    docstring); idempotent. Returns whether torch has varlen flash attention at all (the wrappers are installed
    either way: they are sdpa's where varlen cannot run)."""
    from transformers import masking_utils
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not hasattr(current, "lamelm_varlen_wrapped"):
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _varlen_or_sdpa(current)
    current_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    if not hasattr(current_mask, "lamelm_deferred"):
        ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] = _deferred(current_mask)
    if not hasattr(masking_utils.find_packed_sequence_indices, "lamelm_packed_by_word"):
        masking_utils.find_packed_sequence_indices = _packed_by_word(masking_utils.find_packed_sequence_indices)
    return _varlen_attn is not None
