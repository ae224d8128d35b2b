"""The fine-tuning step's number format: ``precision="bf16"`` (the default) or ``"fp32"`` (the path before it).

The bf16 path is what transformers' ``Trainer`` almost does with ``bf16=True``, with four differences, each measured
on SmolLM2-135M on two cores (``lab bench lora``):

- **Autocast in the training step only.** ``bf16=True`` makes accelerate wrap the model's ``forward`` in autocast for
  good: evaluations, and every later use of the returned model (scoring, generation), would then run in bf16 too.
  Here ``LabTrainer`` (:mod:`lab.train.callbacks`) enters ``torch.autocast(bf16)`` around training forwards and
  backwards only; eval losses are computed in fp32, as on the fp32 path. Master weights stay fp32 (the frozen base,
  the LoRA matrices, AdamW's moments); training forwards read a bf16 copy of each adapted layer's frozen weight
  (made once, 2 bytes a weight) instead of casting the fp32 one at every forward, evaluations the fp32 weight.
- **The adapter's change is added in fp32.** peft adds the LoRA term to the base layer's output in that output's
  dtype. Under autocast that is bf16, and a fresh adapter's change is far below half a bf16 step of the output
  (2^-9 relative), so it rounds away exactly: plain autocast trained A's main run visibly slower than fp32 (eval loss
  0.697 vs 0.647 after a third of the run, 0.114 vs 0.100 at the end), and a small learning rate would hardly train
  at all. So each adapted layer's frozen base returns fp32 (a forward hook): the sum is fp32, and the ops after it
  (rotary embeddings, SiLU-gating, the fp32 residual stream) keep it off the bf16 grid, so later roundings are
  unbiased. Attention's P @ V consumes ``v_proj``'s output unchanged, so that base layer computes in fp32
  (:data:`FP32_BASE`, 3 % of the layer's matmul work). The gradients themselves are fine in bf16 (cosine 0.9998
  with the fp32 ones, 1 % of signs flipped, on A's first batch).
- **Eager attention while training.** PyTorch's CPU flash-attention kernel (``sdpa``) is slow in bf16 for these short
  sequences, its backward above all (~9 ms per layer for 8x80 tokens); the eager softmax(QK^T)V is the same math,
  ~13 % of the step faster. The model's own attention is restored when training ends.
- **Logits only where a label is.** The answer is a third of an example's tokens; the LM head (49k-word vocabulary,
  ~18 % of the step) and the fp32 cross-entropy run on the positions whose next token carries a label in some
  row of the batch (``logits_to_keep`` + ``shift_labels``), through the model's own loss function, so the loss is the
  same number as over every position.

Padding costs little on the lab's tasks (4 % of A's batch tokens), so batches are not bucketed by length: that
would change which examples share a step and so the training itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS = ("bf16", "fp32")  # FinetuneConfig.precision
TRAIN_ATTENTION = "eager"  # transformers' attention implementation on the bf16 path while training
FP32_BASE = ("v_proj",)  # adapted layers whose output reaches a bf16 matmul unchanged (attention's P @ V)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype a training step autocasts to (None: no autocast, the fp32 path)."""
    return torch.bfloat16 if precision == "bf16" else None


def nf4_compute_dtype(precision: str) -> torch.dtype:
    """QLoRA's compute dtype: bf16 on CUDA on the bf16 path (QLoRA's usual setting); fp32 on CPUs, where the training
    step autocasts anyway and the eval loss stays the fp32 value of the dequantized model."""
    return torch.bfloat16 if precision == "bf16" and torch.cuda.is_available() else torch.float32


def _upcast_output(module, args, output):
    return output.float()


def _fp32_forward(forward):
    def fp32(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float(), *args, **kwargs)

    return fp32


def _bf16_copy_forward(linear: torch.nn.Linear):
    """``linear``'s forward from a bf16 copy of its frozen weight under autocast (no per-forward cast of the fp32
    weight), its fp32 weight otherwise (evaluations); the output in fp32 either way."""
    weight16 = linear.weight.detach().to(torch.bfloat16)
    bias16 = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(x):
        if torch.is_autocast_enabled(x.device.type):
            return torch.nn.functional.linear(x, weight16, bias16).float()
        return torch.nn.functional.linear(x, linear.weight, linear.bias)

    return forward


@contextmanager
def training_numerics(model, precision: str) -> Iterator[None]:
    """Within the block, on the bf16 path: :data:`TRAIN_ATTENTION`, and every LoRA-adapted layer's frozen base
    returns fp32 (computed from a bf16 copy of its weight; :data:`FP32_BASE` ones in fp32), so the adapter's change
    survives rounding. The model is as before after the block; on the fp32 path nothing changes."""
    if precision != "bf16":
        yield
        return
    from peft.tuners.lora import LoraLayer

    hooks, swapped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if name.rsplit(".", 1)[-1] in FP32_BASE:
            base.forward = _fp32_forward(base.forward)
        elif type(base) is torch.nn.Linear and not base.weight.requires_grad:
            base.forward = _bf16_copy_forward(base)
        else:  # a quantized base (QLoRA): its own kernel, output upcast
            hooks.append(base.register_forward_hook(_upcast_output))
            continue
        swapped.append(base)
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    config._attn_implementation = TRAIN_ATTENTION  # read at every forward by transformers' attention and masks
    try:
        yield
    finally:
        config._attn_implementation = before
        for hook in hooks:
            hook.remove()
        for base in swapped:
            del base.forward  # the class's forward again


def labelled_positions(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` plus ``logits_to_keep`` (the positions whose next token is labelled in at least one row) and those
    positions' ``shift_labels``, so a transformers causal LM computes logits and its loss there only.

    The loss is unchanged: a dropped position predicts an unlabelled token in every row, which the full loss ignores.
    """
    labels = inputs["labels"]  # (B, T), -100 where no loss
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): the token each position predicts
    keep = (shifted != -100).any(dim=0).nonzero().squeeze(1)  # (K,)
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}
