"""The fused loss of ``patch(cross_entropy=True)``: the causal LM's forward asks lm_head, through a
request object, for the loss fused with lm_head (``ops.linear_cross_entropy``) instead of the logits."""

import dataclasses
import inspect

import torch

from .layer import function_hash

# sha256 of the causal-LM forwards (unwrapped) that soft-cap lm_head's output, when
# config.final_logit_softcapping is set, as ``logits = cap · tanh(logits / cap)`` before their loss, and
# return it as the logits: Gemma2ForCausalLM's and Gemma3ForCausalLM's, transformers 5.25.0 and 5.17.0.
SOFT_CAPPING_FORWARDS = {"1ecc511c075fa0aa9ba73a0cd67086b793a40e6567534c8ee97c8dccf492cacf",
                         "7f0c0169c48d696dabbd67cf8804654233398975a3f0eef34c627bd81d1feda1",
                         "f20633752ccce2e65418b453892e7bd7264975faa67b90e2815764fdf4396351",
                         "3a9c1c207da904a2860a775e8a1cfb22f65bb6e9696dd21aacdcd867bd013c4d"}


def soft_caps_head_output(model_class: type) -> bool:
    """Whether ``model_class.forward`` is one of SOFT_CAPPING_FORWARDS: then the fused loss, which lm_head
    returns through that forward, comes back soft-capped, and is un-capped (``fused_loss_forwards``)."""
    try:
        return function_hash(model_class.forward) in SOFT_CAPPING_FORWARDS
    except (OSError, TypeError):  # no source to read
        return False


def head_linear(head):
    """The nn.Linear of an lm_head: itself, or the base layer PEFT wraps it in."""
    return getattr(head, "base_layer", head)


def _head_weight(head):
    """lm_head's weight and bias as its forward would use them: with a LoRA adapter on lm_head, the
    base weight plus each active adapter's delta (differentiable in the adapter), which is only the
    same as the adapter's forward without LoRA dropout."""
    linear = head_linear(head)
    if linear is head or getattr(head, "merged", False) or getattr(head, "disable_adapters", False):
        return linear.weight, linear.bias
    weight = linear.weight
    for name in head.active_adapters:
        if name not in getattr(head, "lora_A", {}):
            continue
        dropout = head.lora_dropout[name]
        if not isinstance(dropout, torch.nn.Identity) and dropout.p > 0 and head.training:
            raise NotImplementedError("llama_fast cross_entropy: LoRA dropout on lm_head in training cannot be fused "
                                      "(patch with cross_entropy=False, or lora_dropout=0 for lm_head)")
        weight = weight + head.get_delta_weight(name)
    return weight, linear.bias


@dataclasses.dataclass
class _LossRequest:
    """What the patched causal-LM forward asks of lm_head's next call, for one forward: the fused
    loss's arguments, or None for lm_head's own output; ``served`` says whether lm_head computed it."""

    arguments: tuple | None = None
    served: bool = False


def fused_loss_forwards(model: torch.nn.Module):
    """(the causal LM's forward, lm_head's forward) that patch(cross_entropy=True) installs, once, at
    patch time.

    The causal LM's forward keeps the signature of the forward it replaces (transformers' Trainer
    keeps only the dataset columns named there: with ``(*args, **kwargs)`` its default
    ``remove_unused_columns=True`` dropped ``input_ids``) and calls that forward, transformers' own
    (or one a library installed before, such as TRL's fused-head wrapper). Where the fused loss pays,
    in training with ``labels`` (or when the call passes ``skip_logits=True``), it first leaves a
    ``_LossRequest`` for lm_head, whose forward then computes the fused loss from the hidden states
    (no logits) and returns it as lm_head's output; otherwise (evaluation, ``Trainer.predict``,
    ``model.eval()``, ``skip_logits=False``) the call is transformers' own and returns the logits
    and the loss, so no metric ever receives losses where it expects logits (Liger decides the same
    way, by ``self.training``).

    Both halves matter under sharded data parallelism: the weight is read inside lm_head's own call,
    so the hooks FSDP2 and DeepSpeed ZeRO-3 put on lm_head gather it first; and the loss is what
    lm_head returns, so the hooks they put on a module's output to gather the weight again before its
    backward fire on the loss's gradient. (Returning a placeholder and keeping the loss aside, as this
    did first, ran the backward on a resharded, empty weight under FSDP2: the failure Liger's fused
    loss had, Liger-Kernel #332 and #631.) The loss is read back from the class's output, since such
    hooks may hand on a new tensor. lm_head's forward is installed at patch time and the request is an
    attribute of a plain object, because swapping lm_head's forward per call (deleting the instance
    attribute afterwards) cannot be traced: torch.compile failed on it with every backend."""
    head = model.lm_head
    request = _LossRequest()
    previous = vars(model).get("forward")  # e.g. TRL's fused-head wrapper, which calls the class's forward
    previous_head = vars(head).get("forward")  # e.g. a tensor-parallel plan's
    signature = inspect.signature(model.forward)
    positional = []  # the leading parameters a caller may pass by position, as the replaced forward names them
    for name, parameter in signature.parameters.items():
        if parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        positional.append(name)

    def call_previous(self, *args, **kwargs):
        if previous is not None:
            return previous(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)

    def forward(self, *args, labels=None, skip_logits=None, **kwargs):
        if args:  # by name from here on, so that labels given by position are found too
            named = dict(zip(positional, args))
            if len(args) > len(positional) or "labels" in named and labels is not None or named.keys() & kwargs:
                raise TypeError(f"{type(self).__name__}.forward: too many positional arguments, or one given twice")
            labels = named.pop("labels", labels)
            kwargs.update(named)
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        if not skip_logits or kwargs.get("fused_lm_head"):
            # fused_lm_head=True asks TRL's own fused head (for its loss, entropy and accuracy metrics), which reads
            # lm_head's weight itself: left to it. SFTTrainer installs it after patching, around this forward; where
            # it was installed first, it is the previous forward called here, and needs the labels
            return call_previous(self, labels=labels, **kwargs)
        if labels is None:
            raise ValueError("llama_fast cross_entropy: skip_logits=True needs labels (the fused loss is all such a "
                             "call returns)")
        if self.lm_head is not head:
            raise RuntimeError("llama_fast cross_entropy: lm_head was replaced after patch() (resize_token_embeddings "
                               "does that), or this model is a copy.deepcopy of a patched one (whose forward still "
                               "serves the original's lm_head); call llama_fast.patch(model, cross_entropy=True) again")
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        request.arguments = (labels, kwargs.get("num_items_in_batch"), kwargs.get("shift_labels"), softcap)
        request.served = False
        try:
            out = call_previous(self, return_dict=True, **kwargs)
        finally:
            request.arguments = None
        if not request.served or out.logits is None or out.logits.dim() != 0:
            raise RuntimeError(f"llama_fast cross_entropy: {type(self).__name__}.forward did not return lm_head's "
                               "output as its logits; patch with cross_entropy=False")
        loss = out.logits
        if softcap:
            # The loss (computed on soft-capped logits, as the model's own) went through the forward's soft-cap
            # of lm_head's output, y = cap · tanh(loss / cap) (validate.py admits only SOFT_CAPPING_FORWARDS
            # then), and comes back through its inverse: the identity, differentiable, within a few ulps while
            # loss / cap < 3, where tanh's slope is above 0.01 (Gemma's caps are 30 and over; the loss ln(vocab)
            # at worst). Kept on lm_head's output path, not returned aside, for the sharding hooks above.
            loss = softcap * torch.atanh(loss / softcap)
        out.loss, out.logits = loss, None
        return out if return_dict else out.to_tuple()

    forward.__signature__ = signature.replace(parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                                                          *signature.parameters.values()])
    forward.__doc__ = getattr(model.forward, "__doc__", None)

    def head_forward(self, hidden, *args, **kwargs):
        arguments = request.arguments
        if arguments is None:
            if previous_head is not None:
                return previous_head(hidden, *args, **kwargs)
            return type(self).forward(self, hidden, *args, **kwargs)
        request.arguments, request.served = None, True
        return _fused_causal_lm_loss(self, hidden, *arguments)

    return forward, head_forward


def _fused_causal_lm_loss(head, hidden, labels, num_items_in_batch, shift_labels, softcap):
    """transformers' ForCausalLMLoss (labels shifted left, -100 ignored, num_items_in_batch) by
    ops.linear_cross_entropy on lm_head's weights."""
    from .. import ops

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    tokens = hidden.reshape(-1, hidden.shape[-1])
    if tokens.shape[0] != shift_labels.shape[0]:
        raise ValueError(f"llama_fast cross_entropy: {tokens.shape[0]} positions (after logits_to_keep) but "
                         f"{shift_labels.shape[0]} labels")
    weight, bias = _head_weight(head)
    return ops.linear_cross_entropy(tokens, weight, shift_labels, bias=bias, num_items_in_batch=num_items_in_batch,
                                    logit_softcap=softcap)


def fsdp2_shards(model: torch.nn.Module, head: torch.nn.Module, weight) -> bool:
    """Whether ``weight``, a sharded DTensor, is FSDP2's to gather (the model or lm_head went through
    ``fully_shard``, on a one-dimensional mesh): then lm_head's own call sees it whole."""
    from torch.distributed.fsdp import FSDPModule

    sharded_by_fsdp2 = isinstance(head, FSDPModule) or isinstance(model, FSDPModule)
    return sharded_by_fsdp2 and weight.device_mesh.ndim == 1
