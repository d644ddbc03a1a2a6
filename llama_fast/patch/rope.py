"""RoPE: ``LlamaAttention.forward`` calls the module-level ``apply_rotary_pos_emb`` of its modeling file.

Where that forward is one verified here (``VERIFIED_SOURCES``, by a hash of its source: 5.24's and 5.25's, 5.17's),
each patched attention instance gets ``_forward_with_cache_write``: transformers' lines, written out, with
the rotation and the KV-cache update one kernel at inference (kv_cache.py), and otherwise transformers' two calls
(``ops.apply_rotary_pos_emb``, then ``cache.update``). Elsewhere (another transformers, a subclass with
its own forward) it gets a copy of transformers' own forward whose global namespace maps that one name
to ``ops.apply_rotary_pos_emb``: the code that runs, the cache update included, is transformers' own.
The modeling module itself is left untouched either way."""

import dis
import functools
import types

import torch

from .layer import function_hash

# sha256 of LlamaAttention.forward's source (unwrapped, its deprecate_kwarg line included) that
# _forward_with_cache_write was written against and tested with, and the transformers versions that have it.
VERIFIED_SOURCES = {"e080b5cc468cd0a507951a329a0b79aa69d8ec0cc2a6c0861f46f96ae00be531": ("5.24.0", "5.25.0"),
                    # 5.17 differs only in its cache keyword (past_key_values) and update call (no kwargs)
                    "dc6807936ef6103d2675e82361b9c82359d43356a331140bbb1a974595522bff": ("5.17.0",)}

_NAME = "apply_rotary_pos_emb"


def _with_globals(fn, replacements: dict):
    """A copy of ``fn`` that resolves the names in ``replacements`` to new values.

    Decorators that wrap with functools.wraps (transformers' ``deprecate_kwarg``) are copied too,
    so the wrapper keeps calling the rebound inner function. ``fn``'s module is not touched.
    """
    inner = getattr(fn, "__wrapped__", None)
    closure = fn.__closure__
    if inner is not None and closure is not None:
        new_inner = _with_globals(inner, replacements)
        closure = tuple(types.CellType(new_inner) if c.cell_contents is inner else c for c in closure)
    namespace = fn.__globals__
    if fn.__code__.co_names:
        # Without "__name__": torch 2.11's dynamo takes a namespace that has one for that module's
        # globals and guards on sys.modules[name].apply_rotary_pos_emb, the original function, so a
        # compiled patched model failed building its guards. With none it guards this dict itself,
        # as torch 2.14 does for any namespace that is not its module's.
        namespace = {key: value for key, value in fn.__globals__.items() if key != "__name__"} | replacements
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    if inner is not None and closure is not None:
        copy.__wrapped__ = new_inner
    copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return copy


def _loads_global(fn, name: str) -> bool:
    """Whether ``fn``, or an inner function its ``functools.wraps`` decorators call (the ones
    ``_with_globals`` copies), reads the global ``name``: only then does rebinding that name change
    what it runs."""
    if any(i.opname == "LOAD_GLOBAL" and i.argval == name for i in dis.get_instructions(fn)):
        return True
    inner = getattr(fn, "__wrapped__", None)
    cells = fn.__closure__ or ()
    return inner is not None and any(c.cell_contents is inner for c in cells) and _loads_global(inner, name)


def check_rebinding(attention_class: type) -> None:
    """Refuse (``ValueError``, before anything changes) when ``attention_class.forward`` does not read
    ``apply_rotary_pos_emb`` as a global of its module: a transformers that renamed or inlined it would
    otherwise be patched "successfully" while its own RoPE kept running."""
    if not _loads_global(attention_class.forward, _NAME):
        import transformers

        raise ValueError(f"llama_fast.patch: {attention_class.__name__}.forward in transformers "
                         f"{transformers.__version__} does not call {_NAME} by that global name, so llama_fast's RoPE "
                         "would not take effect; pass rope=False (transformers 5.24 calls it so)")


def forward_with_our_rope(attention_module, backend):
    from .. import ops
    from .families import rotation

    forward = type(attention_module).forward
    if function_hash(forward) in VERIFIED_SOURCES:
        return _forward_with_cache_write(backend)
    rotate = partial_rotation if rotation(type(attention_module)) == "partial" else ops.apply_rotary_pos_emb
    return _with_globals(forward, {_NAME: functools.partial(rotate, backend=backend)})


def partial_rotation(q, k, cos, sin, unsqueeze_dim=1, *, backend=None):
    """Phi-3's ``apply_rotary_pos_emb``: the first cos.shape[-1] features of each head rotated (by
    ``ops.apply_rotary_pos_emb``, which reads those views in place), the rest passed through, as transformers
    concatenates them."""
    from .. import ops

    rotated = cos.shape[-1]
    if rotated == q.shape[-1]:
        return ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, backend=backend)
    q_rot, k_rot = ops.apply_rotary_pos_emb(q[..., :rotated], k[..., :rotated], cos, sin, unsqueeze_dim,
                                            backend=backend)
    return torch.cat([q_rot, q[..., rotated:]], dim=-1), torch.cat([k_rot, k[..., rotated:]], dim=-1)


def _forward_with_cache_write(backend):
    """transformers' ``LlamaAttention.forward`` (5.24's, or 5.17's with its cache keyword), its rotation
    and cache update fused where ``kv_cache.rope_and_write`` applies; every other line is transformers'
    own, in its order."""
    # here, not at module level: `import llama_fast` imports no transformers (tests/test_first_run.py)
    from transformers.models.llama.modeling_llama import (
        ALL_ATTENTION_FUNCTIONS,
        LlamaAttention,
        eager_attention_forward,
    )
    from transformers.utils.deprecation import deprecate_kwarg

    from .. import ops
    from .kv_cache import rope_and_write, verified_layers
    from .layer import cache_keyword

    verified = verified_layers()
    since_5_24 = cache_keyword(LlamaAttention.forward) == "cache"

    def body(self, hidden_states, position_embeddings, attention_mask, cache, kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        written = None
        if cache is not None:
            written = rope_and_write(cache, self.layer_idx, query_states, key_states, value_states, cos, sin, backend,
                                     verified)
        if written is not None:
            query_states, key_states, value_states = written
        else:
            query_states, key_states = ops.apply_rotary_pos_emb(query_states, key_states, cos, sin, backend=backend)
            if cache is not None and since_5_24:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
            elif cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    if not since_5_24:  # transformers 5.17
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                    **kwargs):
            return body(self, hidden_states, position_embeddings, attention_mask, past_key_values, kwargs)

        return forward

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        return body(self, hidden_states, position_embeddings, attention_mask, cache, kwargs)

    return forward
