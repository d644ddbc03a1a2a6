"""The decoder layer: its post-attention residual add fused into ``post_attention_layernorm``.

transformers 5.24's ``LlamaDecoderLayer.forward`` (models/llama/modeling_llama.py) ends its attention
block with these lines, which this file replaces:

        hidden_states = residual + hidden_states

        # Fully Connected
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)

an add kernel, then the norm's kernel reading back the sum the add wrote (Inductor cannot fuse through the
norm's opaque custom op; at batch-1 decode each launch costs). They become one
``ops.add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon)``, which returns the norm
and the sum (the next residual), rounded as eager rounds them. Every other line is transformers' own, in
its order; the signature is transformers' (its keywords, the deprecated ``past_key_values``), and
``input_layernorm``, ``self_attn`` and ``mlp`` are called as submodules as transformers calls them, so
their hooks, PEFT's adapters inside them and tensor-parallel plans on their linears work unchanged.
validate.py checks, by a hash of its source, that the installed forward is the one written out here.
When ``mlp`` is patched too (its forward takes the residual), the MLP's residual add goes into the
down projection's GEMM (``down_with_residual``): the layer's last two lines become one call.

Per call, the layer runs transformers' own forward instead (its norms still patched, each its own
kernel) when fusing would change more than the two launches:

- gradient checkpointing in training: transformers checkpoints the layer by wrapping the class's
  ``forward`` (``GradientCheckpointingLayer.__init_subclass__``, also for the subclass FSDP2 makes),
  which an instance forward shadows. Rather than copy that wrapper's cache handling, the call goes to
  the class's forward, which checkpoints transformers' body;
- ``post_attention_layernorm`` has hooks of its own, which the fused op, not calling the module, would skip;
- the op would not run its kernel (a CPU tensor without Triton's interpreter: it would run the eager
  reference where the unfused norm runs the C++ extension's kernel).
"""

import functools
import hashlib
import inspect

import torch

from ..backend import interpreting

# sha256 of the source of LlamaDecoderLayer.forward (unwrapped: transformers' checkpointing wrapper and
# deprecate_kwarg aside, its decorator line included) that the forward below was written against and
# tested with, and the transformers versions that have it.
VERIFIED_SOURCES = {"2b52523b7afe2a371de1384a5c81b6f64e9a32b7490388160afea6edb28ff5c2": ("5.24.0", "5.25.0"),
                    # 5.17 differs only in its cache keyword, past_key_values (the lent H200 runs 5.17)
                    "75d1d62e173e8c574b8a61338d1fa5052774d13b848eecd282cde88cd6690b8e": ("5.17.0",)}


@functools.cache
def function_hash(fn) -> str:
    """sha256 of a function's source, unwrapped (decorators that use functools.wraps aside): what the
    patch pins a transformers method it reproduces by. Kept per function object: patch() asks it of every
    norm, MLP and layer's class forward (a 32-layer model: about a hundred calls for a few functions,
    each an inspect.getsource), and a function replaced at run time is another object, hashed afresh."""
    return hashlib.sha256(inspect.getsource(inspect.unwrap(fn)).encode()).hexdigest()


def source_hash(layer_class) -> str:
    return function_hash(layer_class.forward)


def is_plain(layer) -> bool:
    """Whether ``layer`` runs its class's forward itself (the caller checks that forward's source), with a
    post-attention norm that computes Llama's RMSNorm: neither it nor that norm has an instance forward
    of its own (accelerate's device hooks, another library's patch), which the fused forward would bypass."""
    from .families import is_rms_norm

    norm = getattr(layer, "post_attention_layernorm", None)
    return ("forward" not in vars(layer) and isinstance(norm, torch.nn.Module) and is_rms_norm(norm)
            and "forward" not in vars(norm))


def _fuses(layer, norm, hidden_states, backend) -> bool:
    """Whether this call runs the fused forward (the module docstring's three exceptions); a few attribute
    reads, on every layer's every call."""
    if layer.gradient_checkpointing and layer.training:
        return False
    if norm._forward_pre_hooks or norm._forward_hooks or norm._backward_pre_hooks or norm._backward_hooks:
        return False
    return backend == "triton" or hidden_states.is_cuda or interpreting()


def down_with_residual(down_proj, act, residual):
    """``residual + down_proj(act)``: one ``addmm`` (cuBLAS adds the residual in the GEMM's epilogue,
    rounding once where eager rounds the product, then the sum) for a plain ``nn.Linear`` without bias,
    hooks, an instance forward or a distributed weight; else the projection, then the add. One kernel
    fewer per layer, where Inductor cannot fuse that add across the opaque SwiGLU op before it. Not
    under autocast, where the product would be low precision and eager's sum the residual's dtype."""
    plain = (type(down_proj) is torch.nn.Linear and down_proj.bias is None and "forward" not in vars(down_proj)
             and not (down_proj._forward_pre_hooks or down_proj._forward_hooks or down_proj._backward_pre_hooks
                      or down_proj._backward_hooks)
             and type(down_proj.weight) in (torch.Tensor, torch.nn.Parameter) and type(act) is torch.Tensor
             and type(residual) is torch.Tensor and act.dtype == down_proj.weight.dtype == residual.dtype
             and not torch.is_autocast_enabled(act.device.type))
    if not plain:  # any other module (LoRA, a quantised or tensor-parallel linear, a stand-in): as eager
        return residual + down_proj(act)
    out = torch.addmm(residual.reshape(-1, residual.shape[-1]), act.reshape(-1, act.shape[-1]), down_proj.weight.t())
    return out.view(residual.shape)


def cache_keyword(forward) -> str:
    """The name a transformers forward takes the KV cache by: ``cache`` from 5.24 (``past_key_values``
    deprecated), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(inspect.unwrap(forward)).parameters else "past_key_values"


def fused_layer_forward(layer_class, backend):
    """The forward the patched decoder layers of class ``layer_class`` get (``backend``: None or "triton"),
    with that class's signature: the cache keyword ``cache`` (5.24) or ``past_key_values`` (5.17),
    passed on to the attention module under that name."""
    # here, not at module level: `import llama_fast` imports no transformers (tests/test_first_run.py)
    from transformers.utils.deprecation import deprecate_kwarg

    keyword = cache_keyword(layer_class.forward)

    def body(self, hidden_states, attention_mask, position_ids, cache, use_cache, position_embeddings, kwargs):
        from .. import ops

        norm = self.post_attention_layernorm
        if not _fuses(self, norm, hidden_states, backend):
            return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=use_cache, position_embeddings=position_embeddings,
                                      **{keyword: cache}, **kwargs)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        # Self Attention
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **{keyword: cache},
            **kwargs,
        )
        # The residual add, its sum kept as the next residual, and the post-attention norm of it: one kernel.
        hidden_states, residual = ops.add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon,
                                                   backend=backend)
        # Fully Connected
        mlp = self.mlp
        if (getattr(getattr(vars(mlp).get("forward"), "__func__", None), "takes_residual", False)
                and not (mlp._forward_hooks or mlp._forward_pre_hooks)):
            # the residual add inside down_proj's GEMM; not with hooks on mlp, which must see its own output
            return mlp(hidden_states, residual=residual)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states

    if keyword == "past_key_values":  # transformers 5.17
        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            return body(self, hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                        position_embeddings, kwargs)

        return forward

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        return body(self, hidden_states, attention_mask, position_ids, cache, use_cache, position_embeddings, kwargs)

    return forward
