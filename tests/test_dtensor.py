"""DTensor inputs to the ops, and transformers' tensor-parallel plan with the patch, on 2 CPU processes
(gloo), against the same thing in one process.

One ``torchrun --nproc_per_node 2`` of this file (``_worker``; start-up costs seconds, so everything runs
in that one launch) writes each rank's results to a temporary directory; the tests read them:

- every supported placement of every op (llama_fast/ops/_dtensor.py): the output, gathered, equals
  the single-process op on the full tensor (bit for bit where each rank computes its rows exactly as
  the whole op does), and output and input gradients pass the error-ratio rule against float64;
- every refused placement raises the op's ValueError on both ranks, never a wrong answer;
- ``from_pretrained(..., tp_plan="auto")`` of a tiny Llama split over the 2 ranks, patched: logits,
  loss and every parameter's gradient against the unpatched model in one process (error-ratio rule),
  and greedy generation; transformers' plan hands our ops plain local tensors.

The workers import conftest.py, as this process does: Triton's interpreter runs the kernels (with
its bf16 fixes), so the attention and loss cases and the tensor-parallel model run the Triton kernels
a GPU runs. The rms_norm, RoPE and SwiGLU cases run the C++ extension's CPU kernels (``backend="cpu"``,
~10x faster than the interpreter): how an op handles a DTensor does not depend on its backend (the
placement check and the unwrapping come before the backend is chosen).
"""

import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

if __name__ == "__main__":  # a worker: the interpreter set-up before triton is imported
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
    import conftest  # noqa: F401

import pytest
import torch

from helpers import assert_error_ratio, user_env

WORLD = 2
EPS = 1e-5
CPU = dict(backend="cpu")


# Each op as the cases call it: ``run(ops, t)`` with the tensors of a case in ``t`` (plain or DTensor),
# ``ref(t)`` the eager reference (for the error-ratio rule, in the case's dtype and in float64).
def _rms_norm(ops, t):
    return ops.rms_norm(t["x"], t["weight"], EPS, **CPU)


def _swiglu(ops, t):
    return ops.swiglu(t["gate"], t["up"], **CPU)


def _rope(unsqueeze_dim):
    def run(ops, t):
        return ops.apply_rotary_pos_emb(t["q"], t["k"], t["cos"], t["sin"], unsqueeze_dim, **CPU)

    def ref(refs, t):
        return refs.apply_rotary_pos_emb(t["q"], t["k"], t["cos"], t["sin"], unsqueeze_dim)

    return run, ref


def _attention(ops, t):
    return ops.flash_attention(t["q"], t["k"], t["v"], key_padding_mask=t.get("key_padding_mask"),
                               kv_lens=t.get("kv_lens"))


def _attention_ref(refs, t):
    return refs.attention(t["q"], t["k"], t["v"], key_padding_mask=t.get("key_padding_mask"), kv_lens=t.get("kv_lens"))


def _attention_lse(ops, t):
    return ops.flash_attention(t["q"], t["k"], t["v"], key_padding_mask=t.get("key_padding_mask"), return_lse=True)


def _attention_lse_ref(refs, t):
    return refs.attention(t["q"], t["k"], t["v"], key_padding_mask=t.get("key_padding_mask"), return_lse=True)


def _varlen(ops, t):
    return ops.flash_attention_varlen(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"], 7, 7)


def _varlen_ref(refs, t):
    return refs.attention_varlen(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"])


def _loss(**options):
    def run(ops, t):
        return ops.linear_cross_entropy(t["hidden"], t["weight"], t["labels"], bias=t.get("bias"), **options)

    def ref(refs, t):
        rows, _ = refs.linear_cross_entropy_rows(t["hidden"], t["weight"], t["labels"], t.get("bias"))
        reduction = options.get("reduction", "mean")
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        count = options.get("num_items_in_batch") or (t["labels"] != -100).sum().clamp(min=1)
        return rows.sum() / count

    return run, ref


def _add_rms_norm(ops, t):  # no C++ kernel: Triton in the interpreter
    return ops.add_rms_norm(t["x"], t["residual"], t["weight"], EPS)


OPS = {"rms_norm": (_rms_norm, lambda refs, t: refs.rms_norm(t["x"], t["weight"], EPS)),
       "add_rms_norm": (_add_rms_norm, lambda refs, t: refs.add_rms_norm(t["x"], t["residual"], t["weight"], EPS)),
       "swiglu": (_swiglu, lambda refs, t: refs.swiglu(t["gate"], t["up"])),
       "rope": _rope(1), "rope_bshd": _rope(2), "attention": (_attention, _attention_ref),
       "attention_lse": (_attention_lse, _attention_lse_ref), "varlen": (_varlen, _varlen_ref),
       "varlen_lse": (lambda ops, t: ops.flash_attention_varlen(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"], 7, 7,
                                                                 return_lse=True),
                      lambda refs, t: refs.attention_varlen(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"],
                                                            return_lse=True)),
       "loss_mean": _loss(), "loss_sum": _loss(reduction="sum"),
       "loss_none": _loss(reduction="none"), "loss_items": _loss(num_items_in_batch=7)}


def _inputs(op: str, shapes: str = "") -> dict:
    """The full (unsharded) fp32 inputs of an op's cases. ``shapes`` picks a variant."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{op}/{shapes}".encode()))
    op = op.removesuffix("_lse")  # the same inputs, the op asked for its lse too

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def tables(batch, seq, dim):
        angles = torch.rand(batch, seq, dim // 2, generator=g) * 6
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

    if op == "rms_norm":
        return dict(x=randn(2, 7, 40), weight=1 + 0.1 * randn(40))
    if op == "add_rms_norm":
        return dict(x=randn(2, 7, 40), residual=randn(2, 7, 40), weight=1 + 0.1 * randn(40))
    if op == "swiglu":
        return dict(gate=randn(2, 7, 47), up=randn(2, 7, 47))
    if op in ("rope", "rope_bshd"):
        batch = 2 if shapes == "per_batch_tables" else 1
        cos, sin = tables(batch, 7, 16)
        if op == "rope_bshd":
            return dict(q=randn(2, 7, 4, 16), k=randn(2, 7, 2, 16), cos=cos, sin=sin)
        return dict(q=randn(2, 4, 7, 16), k=randn(2, 2, 7, 16), cos=cos, sin=sin)
    if op == "attention":
        if shapes == "mha":
            return dict(q=randn(1, 3, 8, 16), k=randn(1, 3, 8, 16), v=randn(1, 3, 8, 16))
        if shapes == "gqa_3_kv_heads":
            return dict(q=randn(1, 6, 8, 16), k=randn(1, 3, 8, 16), v=randn(1, 3, 8, 16))
        if shapes == "decode_kv_lens":
            return dict(q=randn(2, 4, 1, 16), k=randn(2, 2, 8, 16), v=randn(2, 2, 8, 16),
                        kv_lens=torch.tensor([5, 8], dtype=torch.int32))
        t = dict(q=randn(2, 4, 8, 16), k=randn(2, 2, 8, 16), v=randn(2, 2, 8, 16))
        if shapes == "padded":
            t["key_padding_mask"] = torch.tensor([[False] * 3 + [True] * 5, [True] * 8])
        return t
    if op == "varlen":
        cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        return dict(q=randn(10, 4, 16), k=randn(10, 2, 16), v=randn(10, 2, 16), cu_q=cu, cu_k=cu.clone())
    if op.startswith("loss"):
        labels = torch.randint(0, 40, (9,), generator=g)
        labels[::4] = -100
        t = dict(hidden=randn(9, 32), weight=randn(40, 32) / 32 ** 0.5, labels=labels)
        if shapes == "bias":
            t["bias"] = randn(40)
        return t
    raise ValueError(op)


# Supported: (name, op, shapes, placements by input ("R", "S<dim>", one per mesh dim: "R,S1" is the 2-D mesh
# (1, 2); unnamed inputs replicated), dtype, whether each rank computes its output rows exactly as the
# whole op does (compared bit for bit)).
SUPPORTED = [
    ("rms_norm_replicated", "rms_norm", "", {}, torch.float32, True),
    ("rms_norm_batch", "rms_norm", "", dict(x="S0"), torch.float32, True),
    ("rms_norm_seq", "rms_norm", "", dict(x="S1"), torch.float32, True),
    ("rms_norm_seq_bf16", "rms_norm", "", dict(x="S1"), torch.bfloat16, True),
    ("rms_norm_batch_inference", "rms_norm", "", dict(x="S0"), torch.float32, True),
    ("rms_norm_2d_mesh", "rms_norm", "", dict(x="R,S1"), torch.float32, True),
    ("add_rms_norm_replicated", "add_rms_norm", "", {}, torch.float32, True),
    ("add_rms_norm_seq", "add_rms_norm", "", dict(x="S1", residual="S1"), torch.float32, True),
    ("add_rms_norm_batch_bf16", "add_rms_norm", "", dict(x="S0", residual="S0"), torch.bfloat16, True),
    ("swiglu_replicated", "swiglu", "", {}, torch.float32, True),
    ("swiglu_seq", "swiglu", "", dict(gate="S1", up="S1"), torch.float32, True),
    ("swiglu_last_dim", "swiglu", "", dict(gate="S2", up="S2"), torch.float32, True),
    ("swiglu_last_dim_bf16", "swiglu", "", dict(gate="S2", up="S2"), torch.bfloat16, True),
    ("rope_replicated", "rope", "", {}, torch.float32, True),
    ("rope_heads", "rope", "", dict(q="S1", k="S1"), torch.float32, True),
    ("rope_heads_bf16", "rope", "", dict(q="S1", k="S1"), torch.bfloat16, True),
    ("rope_q_heads_only", "rope", "", dict(q="S1"), torch.float32, True),
    ("rope_batch", "rope", "per_batch_tables", dict(q="S0", k="S0", cos="S0", sin="S0"), torch.float32, True),
    ("rope_batch_shared_tables", "rope", "", dict(q="S0", k="S0"), torch.float32, True),
    ("rope_seq", "rope", "", dict(q="S2", k="S2", cos="S1", sin="S1"), torch.float32, True),
    ("rope_bshd_heads", "rope_bshd", "", dict(q="S2", k="S2"), torch.float32, True),
    ("attention_replicated", "attention", "", {}, torch.float32, False),
    ("attention_heads_gqa", "attention", "", dict(q="S1", k="S1", v="S1"), torch.float32, False),
    ("attention_heads_gqa_bf16", "attention", "", dict(q="S1", k="S1", v="S1"), torch.bfloat16, False),
    ("attention_heads_mha_uneven", "attention", "mha", dict(q="S1", k="S1", v="S1"), torch.float32, False),
    ("attention_2d_mesh", "attention", "", dict(q="S0,S1", k="S0,S1", v="S0,S1"), torch.float32, False),
    ("attention_batch_padded", "attention", "padded", dict(q="S0", k="S0", v="S0", key_padding_mask="S0"),
     torch.float32, False),
    ("attention_batch_kv_lens", "attention", "decode_kv_lens", dict(q="S0", k="S0", v="S0", kv_lens="S0"),
     torch.float32, False),
    ("varlen_heads", "varlen", "", dict(q="S1", k="S1", v="S1"), torch.float32, False),
    ("attention_lse_heads", "attention_lse", "", dict(q="S1", k="S1", v="S1"), torch.float32, False),
    ("attention_lse_batch_padded", "attention_lse", "padded", dict(q="S0", k="S0", v="S0", key_padding_mask="S0"),
     torch.float32, False),
    ("varlen_lse_heads", "varlen_lse", "", dict(q="S1", k="S1", v="S1"), torch.float32, False),
    ("loss_mean_tokens", "loss_mean", "", dict(hidden="S0", labels="S0"), torch.float32, False),
    ("loss_mean_tokens_bias", "loss_mean", "bias", dict(hidden="S0", labels="S0"), torch.float32, False),
    ("loss_sum_tokens", "loss_sum", "", dict(hidden="S0", labels="S0"), torch.float32, False),
    ("loss_none_tokens", "loss_none", "", dict(hidden="S0", labels="S0"), torch.float32, False),
    ("loss_items_tokens", "loss_items", "", dict(hidden="S0", labels="S0"), torch.float32, False),
    ("loss_mean_replicated", "loss_mean", "", {}, torch.float32, False),
    ("loss_mean_2d_mesh", "loss_mean", "bias", dict(hidden="R,S0", labels="R,S0"), torch.float32, False),
]

# Which inputs are differentiated (the others are tables, masks, offsets, labels).
GRAD = {"x", "residual", "weight", "gate", "up", "q", "k", "v", "hidden", "bias"}
NO_BACKWARD = {"attention_batch_kv_lens",  # kv_lens is forward only
               "rms_norm_batch_inference"}  # no autograd: the launcher called directly on each shard

# Refused: (name, op, shapes, placements ("P": Partial, "plain": a plain tensor), the error's pattern).
REFUSED = [
    ("rms_norm_last_dim", "rms_norm", "", dict(x="S2"),
     r"rms_norm: x is a DTensor with placements \(Shard\(dim=2\),\) on DeviceMesh.*its last dim, which RMSNorm "
     r"reduces over, is sharded\. Redistribute it first"),
    ("rms_norm_sharded_weight", "rms_norm", "", dict(weight="S0"),
     r"rms_norm: weight is a DTensor .* must be replicated"),
    ("rms_norm_plain_weight", "rms_norm", "", dict(weight="plain"),
     r"rms_norm: x is a DTensor but weight is a plain tensor; pass all of them as DTensors"),
    ("rms_norm_partial", "rms_norm", "", dict(x="P"), r"rms_norm: x is a DTensor with placements \(Partial\(sum\),\)"),
    ("add_rms_norm_last_dim", "add_rms_norm", "", dict(x="S2", residual="S2"),
     r"add_rms_norm: x is a DTensor .* its last dim, which RMSNorm reduces over, is sharded"),
    ("add_rms_norm_split_unlike", "add_rms_norm", "", dict(x="S0", residual="S1"),
     r"add_rms_norm: x and residual must be split alike \(the add is elementwise\)"),
    ("add_rms_norm_sharded_weight", "add_rms_norm", "", dict(weight="S0"),
     r"add_rms_norm: weight is a DTensor .* must be replicated"),
    ("swiglu_split_unlike", "swiglu", "", dict(gate="S0", up="S1"), r"swiglu: gate and up must be split alike"),
    ("rope_head_dim", "rope", "", dict(q="S3", k="S3"), r"apply_rotary_pos_emb: q is a DTensor .* head_dim is sharded"),
    ("rope_tables_not_split", "rope", "per_batch_tables", dict(q="S0", k="S0"),
     r"apply_rotary_pos_emb: cos is a DTensor .* must be Shard\(dim=0\)"),
    ("rope_batch_unlike", "rope", "", dict(q="S0", k="S1"),
     r"apply_rotary_pos_emb: q and k must split the batch and the positions alike"),
    ("attention_seq", "attention", "", dict(q="S2", k="S2", v="S2"),
     r"flash_attention: q is a DTensor .* Shard\(dim=2\) splits a dim attention mixes over"),
    ("attention_gqa_misaligned", "attention", "gqa_3_kv_heads", dict(q="S1", k="S1", v="S1"),
     r"flash_attention: k is a DTensor .* 3 KV heads do not split evenly over 2 ranks"),
    ("attention_split_unlike", "attention", "", dict(q="S1", k="S1"), r"flash_attention: q and v must be split alike"),
    ("attention_mask_not_split", "attention", "padded", dict(q="S0", k="S0", v="S0"),
     r"flash_attention: key_padding_mask is a DTensor .* must be \(Shard\(dim=0\),\)"),
    ("varlen_tokens", "varlen", "", dict(q="S0", k="S0", v="S0"),
     r"flash_attention_varlen: q is a DTensor .* splits a dim attention mixes over"),
    ("loss_vocab_parallel", "loss_mean", "", dict(weight="S0"),
     r"linear_cross_entropy: weight is a DTensor .* vocabulary-parallel lm_head"),
    ("loss_hidden_dim", "loss_mean", "", dict(hidden="S1", weight="S1"),
     r"linear_cross_entropy: hidden is a DTensor .* hidden dim, which the logits sum over, is sharded"),
    ("loss_labels_unlike", "loss_mean", "", dict(hidden="S0"),
     r"linear_cross_entropy: hidden and labels must split the tokens alike"),
]


def _placements(spec: str) -> list:
    from torch.distributed.tensor import Partial, Replicate, Shard

    return [Replicate() if s == "R" else Partial() if s == "P" else Shard(int(s[1:])) for s in spec.split(",")]


def _cast(t: dict, dtype) -> dict:
    return {n: v.to(dtype) if v.is_floating_point() else v for n, v in t.items()}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


# The worker: each rank runs this (python -m torch.distributed.run ... this file OUT_DIR MODEL_DIR).


def _distribute(t: dict, specs: dict, meshes: dict, grad: bool) -> dict:
    from torch.distributed.tensor import DTensor, distribute_tensor

    two_d = any("," in s for s in specs.values())
    mesh = meshes[2 if two_d else 1]
    out = {}
    for name, full in t.items():
        spec = specs.get(name, "R,R" if two_d else "R")
        if spec == "plain":
            d = full.clone()
        elif spec == "P":  # each rank holds the whole value: a pending sum of twice it
            d = DTensor.from_local(full.clone(), mesh, _placements(spec), run_check=False)
        else:
            d = distribute_tensor(full, mesh, _placements(spec))
        out[name] = d.requires_grad_(grad and name in GRAD and d.is_floating_point())
    return out


def _run_supported(case, meshes, ops) -> dict:
    from torch.distributed.tensor import distribute_tensor

    name, op, shapes, specs, dtype, _ = case
    full = _cast(_inputs(op, shapes), dtype)
    backward = name not in NO_BACKWARD
    t = _distribute(full, specs, meshes, backward)
    outs = _as_tuple(OPS[op][0](ops, t))
    result = dict(inputs=full, placements=[tuple(map(str, o.placements)) for o in outs],
                  types=[type(o).__name__ for o in outs], outs=[o.full_tensor() for o in outs])
    if backward:
        g = torch.Generator().manual_seed(7)
        dys = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, [distribute_tensor(dy, o.device_mesh, o.placements) for dy, o in zip(dys, outs)])
        result.update(dys=dys, grads={n: v.grad.full_tensor() for n, v in t.items() if v.requires_grad})
    return result


def _run_refused(case, meshes, ops) -> dict:
    name, op, shapes, specs, _ = case
    t = _distribute(_inputs(op, shapes), specs, meshes, False)
    try:
        out = OPS[op][0](ops, t)
    except Exception as exc:  # noqa: BLE001 - the type and the message are what the test checks
        return dict(error=type(exc).__name__, message=str(exc))
    return dict(error=None, message=f"no error; output placements {[o.placements for o in _as_tuple(out)]}")


def _run_model(model_dir: str, ids: torch.Tensor) -> dict:
    """The tiny Llama through transformers' tensor-parallel plan, unpatched and patched: logits, loss,
    gathered gradients; what reached our ops; greedy generation (patched)."""
    import functools

    import transformers
    from torch.distributed.tensor import DTensor

    import llama_fast
    from llama_fast import ops

    seen = {}

    def record(fn_name, fn):
        @functools.wraps(fn)
        def spy(*args, **kwargs):
            kinds = {type(a).__name__ for a in args if isinstance(a, torch.Tensor)}
            seen.setdefault(fn_name, set()).update(kinds)
            return fn(*args, **kwargs)

        return spy

    originals = {n: getattr(ops, n) for n in ("rms_norm", "add_rms_norm", "swiglu", "apply_rotary_pos_emb",
                                              "flash_attention")}
    for n, fn in originals.items():
        setattr(ops, n, record(n, fn))
    if hasattr(transformers, "DistributedConfig"):
        tp = dict(distributed_config=transformers.DistributedConfig(tp_plan="auto"))
    else:  # transformers before DistributedConfig
        tp = dict(tp_plan="auto")
    result = {}
    try:
        for patched in (False, True):
            model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **tp)
            if patched:
                llama_fast.patch(model)
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                     for n, p in model.named_parameters()}
            if patched:
                with torch.no_grad():
                    result["generated"] = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
                # The fused loss is refused under the plan (lm_head is split over the vocabulary), and
                # unpatch gives the plan's own lm_head forward back (patch once deleted it).
                try:
                    llama_fast.patch(model, cross_entropy=True)
                    result["fused_refusal"] = None
                except ValueError as exc:
                    result["fused_refusal"] = str(exc)
                llama_fast.unpatch(model)
                with torch.no_grad():
                    result["after_unpatch"] = model(input_ids=ids).logits
            result["patched" if patched else "unpatched"] = dict(
                logits=out.logits.detach(), loss=out.loss.detach(), grads=grads,
                sharded=sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
                logits_type=type(out.logits).__name__)
    finally:
        for n, fn in originals.items():
            setattr(ops, n, fn)
    result["seen"] = {n: sorted(kinds) for n, kinds in seen.items()}
    return result


def _worker(out_dir: str, model_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llama_fast import ops

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    meshes = {1: init_device_mesh("cpu", (WORLD,)), 2: init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("a", "b"))}
    results = {"supported": {}, "refused": {}}
    for case in SUPPORTED:
        results["supported"][case[0]] = _run_supported(case, meshes, ops)
    for case in REFUSED:
        results["refused"][case[0]] = _run_refused(case, meshes, ops)
    results["model"] = _run_model(model_dir, torch.load(Path(model_dir) / "ids.pt"))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


# The tests.


@pytest.fixture(scope="module")
def run():
    """One 2-process run: each rank's results ("ranks") and the tiny model's directory ("model_dir")."""
    from models import tiny_model, tokens

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        tiny_model().save_pretrained(model_dir)
        torch.save(tokens(2, 11).cpu(), model_dir / "ids.pt")
        # CPU only (gloo), whatever this run's device: no GPU is visible to the workers.
        env = user_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(Path(__file__).resolve()), tmp, str(model_dir)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, f"workers failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        yield dict(ranks=[torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)], model_dir=model_dir)


@pytest.mark.system
@pytest.mark.parametrize("case", SUPPORTED, ids=[c[0] for c in SUPPORTED])
def test_supported_placements_match_one_process(run, case):
    from llama_fast import ops, references

    results = run["ranks"]
    name, op, _, specs, dtype, exact = case
    op_run, ref = OPS[op]
    got = results[0]["supported"][name]
    other = results[1]["supported"][name]
    assert set(got["types"]) == {"DTensor"}, got["types"]
    # the gathered results agree between ranks (each rank's full_tensor())
    for a, b in zip(got["outs"], other["outs"]):
        assert torch.equal(a, b)
    full = got["inputs"]
    backward = name not in NO_BACKWARD
    low = {n: v.detach().requires_grad_(backward and n in GRAD and v.is_floating_point()) for n, v in full.items()}
    eager = {n: v.detach().requires_grad_(backward and n in GRAD and v.is_floating_point()) for n, v in full.items()}
    fp64 = {n: v.detach().double().requires_grad_(backward and n in GRAD) if v.is_floating_point() else v
            for n, v in full.items()}
    single, eager_out = _as_tuple(op_run(ops, low)), _as_tuple(ref(references, eager))
    ref_out = _as_tuple(ref(references, fp64))
    assert len(got["outs"]) == len(single)
    for i, (a, s, e, r) in enumerate(zip(got["outs"], single, eager_out, ref_out)):
        assert a.dtype == s.dtype and a.shape == s.shape
        if exact:
            assert torch.equal(a, s.detach()), f"{name} output {i}: differs from the op on the full tensor"
        assert_error_ratio(a, e.detach(), r.detach(), name=f"{name} output {i}", floor_scale=8)
    if not backward:
        return
    want = [n for n in full if low[n].requires_grad]
    assert sorted(got["grads"]) == sorted(want)
    dys = got["dys"]
    g_single = torch.autograd.grad(single, [low[n] for n in want], dys)
    g_eager = torch.autograd.grad(eager_out, [eager[n] for n in want], dys)
    g_ref = torch.autograd.grad(ref_out, [fp64[n] for n in want], [d.double() for d in dys])
    for n, s, e, r in zip(want, g_single, g_eager, g_ref):
        a = got["grads"][n]
        assert torch.equal(a, results[1]["supported"][name]["grads"][n])
        assert a.dtype == s.dtype and a.shape == s.shape
        assert_error_ratio(a, e, r, name=f"{name} grad of {n}", floor_scale=8)


@pytest.mark.system
@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_placements_raise(run, case):
    import re

    results = run["ranks"]
    name, pattern = case[0], case[-1]
    for rank in range(WORLD):
        got = results[rank]["refused"][name]
        assert got["error"] == "ValueError", f"rank {rank}: {got}"
        assert re.search(pattern, got["message"]), f"rank {rank}: {got['message']!r} does not match {pattern!r}"


@pytest.mark.system
def test_tensor_parallel_model_patched_matches_one_process(run):
    """from_pretrained(tp_plan="auto") over 2 ranks, patched (and unpatched), against the unpatched
    model in one process (fp32) and in float64: logits, loss, every parameter's gradient; greedy tokens."""
    import transformers

    from models import clone

    results = run["ranks"]
    model_results = results[0]["model"]
    tp, tp_eager = model_results["patched"], model_results["unpatched"]
    assert "model.layers.0.self_attn.q_proj.weight" in tp["sharded"], "the plan did not apply"
    # transformers' plan hands each layer's output on as a local tensor: our ops get plain tensors
    assert set(model_results["seen"]) == {"rms_norm", "add_rms_norm", "swiglu", "apply_rotary_pos_emb",
                                          "flash_attention"}
    assert all(kinds in (["Tensor"], ["Parameter", "Tensor"]) for kinds in model_results["seen"].values())
    single = transformers.LlamaForCausalLM.from_pretrained(run["model_dir"], dtype=torch.float32)
    ids = torch.load(run["model_dir"] / "ids.pt")
    runs = {"eager": single, "ref": clone(single, torch.float64)}
    out = {}
    for name, model in runs.items():
        o = model(input_ids=ids, labels=ids)
        o.loss.backward()
        out[name] = (o.logits.detach(), o.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (le, se, ge), (lr, sr, gr) = out["eager"], out["ref"]
    for label, run in (("patched", tp), ("unpatched", tp_eager)):
        assert run["logits_type"] == "Tensor"
        assert_error_ratio(run["logits"], le, lr, name=f"{label} TP logits", floor_scale=8)
        assert_error_ratio(run["loss"], se, sr, name=f"{label} TP loss", floor_scale=8)
        assert set(run["grads"]) == set(gr)
        for n in gr:
            assert_error_ratio(run["grads"][n], ge[n], gr[n], name=f"{label} TP grad {n}", floor_scale=8)
    for rank in range(WORLD):  # every rank holds the same replicated results
        assert torch.equal(results[rank]["model"]["patched"]["logits"], tp["logits"])
    with torch.no_grad():
        expected = single.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(model_results["generated"], expected)
    assert "cross_entropy=True with lm_head split by tensor parallelism" in (model_results["fused_refusal"] or "")
    assert torch.equal(model_results["after_unpatch"], tp_eager["logits"])  # transformers' code again, bit for bit


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
