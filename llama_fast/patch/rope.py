"""RoPE: ``LlamaAttention.forward`` calls the module-level ``apply_rotary_pos_emb`` of its modeling file.
Each patched attention instance gets a copy of transformers' own forward whose global namespace maps
that one name to ``llama_fast.ops.apply_rotary_pos_emb``: the code that runs, the cache update included,
is transformers' own, and the modeling module itself is left untouched."""

import dis
import functools
import types

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

    forward = type(attention_module).forward
    return _with_globals(forward, {_NAME: functools.partial(ops.apply_rotary_pos_emb, backend=backend)})
