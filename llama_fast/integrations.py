"""llama_fast in the trainers people already use.

``LlamaFastCallback`` patches the model a transformers ``Trainer`` (or a subclass: TRL's
SFTTrainer is one) trains, at the end of the Trainer's construction. That is the right moment
for three reasons: the model is then the one the Trainer will train (a PEFT ``PeftModel`` when
LoRA is used, which ``patch`` looks inside); gradient checkpointing is switched on later, in
``train()``, and works on patched modules; and the DDP wrapper is put on later too (FSDP2 shards
modules in place, which patching does not disturb).

An integration that silently does nothing is the common complaint about such hooks (transformers
#34016, LLaMA-Factory #7965), so this one is loud: a model ``patch`` cannot serve raises its
``ValueError`` at construction, every kernel switched off is refused, and when training starts the
model the Trainer holds must be patched (a model swapped in after construction, or unpatched,
raises instead of training on transformers' code unnoticed).
"""

from transformers import TrainerCallback

from .patch import is_patched, patch, patched_options

_KERNELS = ("rms_norm", "rope", "swiglu", "attention", "cross_entropy")


class LlamaFastCallback(TrainerCallback):
    """``Trainer(..., callbacks=[LlamaFastCallback()])``: the Trainer's model runs llama_fast's kernels.

    Keyword arguments are ``llama_fast.patch``'s (``cross_entropy=True`` for the fused loss, a kernel
    flag False to leave that part to transformers, ``backend``). The fused loss runs in training steps
    only: ``evaluate`` and ``predict`` (the model in eval mode) get transformers' logits and loss, and
    the patched forward keeps the signature the Trainer reads to choose dataset columns, so its
    default ``remove_unused_columns=True`` works.
    """

    def __init__(self, **patch_options):
        unknown = set(patch_options) - {*_KERNELS, "backend"}
        if unknown:
            raise TypeError(f"LlamaFastCallback: unknown option(s) {sorted(unknown)}; it takes llama_fast.patch's "
                            f"keywords {[*_KERNELS, 'backend']}")
        defaults = dict(rms_norm=True, rope=True, swiglu=True, attention=True, cross_entropy=False)
        if not any({**defaults, **patch_options}[k] for k in _KERNELS):
            raise ValueError("LlamaFastCallback: every kernel is switched off, so patching would change nothing")
        self.patch_options = patch_options

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("LlamaFastCallback: the Trainer has no model to patch (built with model_init? "
                             "call llama_fast.patch inside your model_init instead)")
        patch(model, **self.patch_options)
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not is_patched(model):
            raise RuntimeError(f"LlamaFastCallback: the model the Trainer is about to train "
                               f"({type(model).__name__}) is not patched by llama_fast: was it replaced after the "
                               "Trainer was built, or unpatched? Patch it again or drop the callback")
        options = patched_options(model)
        wanted = {k: v for k, v in self.patch_options.items() if options.get(k) != v}
        if wanted:
            raise RuntimeError(f"LlamaFastCallback: the model was re-patched with other options since; "
                               f"expected {wanted}, found {options}")
        return control
