"""Bytes and FLOPs of each op: the one place the benchmarks, the traffic count and the README take
them from. Each is the minimum an ideal fused kernel must move or compute, element sizes in bytes
(``e`` for activations, ``w`` for weights).
"""


def rms_norm_bytes(rows: int, cols: int, e: int, w: int, mode: str) -> int:
    # forward reads x and w and writes y; backward reads x, dy, w and writes dx, dw
    # (the fp32 rstd, 4 bytes a row, is left out: under 0.1% at hidden 576)
    if mode == "fwd":
        return rows * cols * 2 * e + cols * w
    if mode == "bwd":
        return rows * cols * 3 * e + 2 * cols * w
    return rms_norm_bytes(rows, cols, e, w, "fwd") + rms_norm_bytes(rows, cols, e, w, "bwd")


def rope_bytes(batch: int, seq: int, q_heads: int, kv_heads: int, head_dim: int, e: int, mode: str) -> int:
    # q and k read and written once, cos and sin read once (shared by the batch)
    one = batch * seq * head_dim * (q_heads + kv_heads) * 2 * e + 2 * seq * head_dim * e
    return 2 * one if mode == "fwdbwd" else one


def swiglu_bytes(rows: int, cols: int, e: int, mode: str) -> int:
    # forward: gate, up in, out; backward: dout, gate, up in, dgate, dup out
    per = {"fwd": 3, "bwd": 5, "fwdbwd": 8}[mode]
    return rows * cols * per * e


def attention_pairs(q_len: int, kv_len: int, causal: bool, window: int | None = None) -> int:
    """(query, key) pairs that are computed: all of them, or the bottom-right causal band, or with a
    sliding ``window`` the last ``window`` keys of each query's band."""
    if not causal:
        return q_len * kv_len
    offset = kv_len - q_len
    seen = (min(kv_len, max(0, i + offset + 1)) for i in range(q_len))
    return sum(seen if window is None else (min(n, window) for n in seen))


def attention_flops(batch: int, q_heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool, mode: str,
                    window: int | None = None) -> int:
    # two matrix products forward (QKᵀ, PV), five backward: 4·pairs·D forward, 2.5× that backward
    fwd = 4 * batch * q_heads * attention_pairs(q_len, kv_len, causal, window) * head_dim
    return {"fwd": fwd, "bwd": int(2.5 * fwd), "fwdbwd": int(3.5 * fwd)}[mode]


def attention_decode_bytes(batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int,
                           e: int) -> int:
    # K and V read once per KV head, q read and out written
    return 2 * batch * kv_heads * kv_len * head_dim * e + 2 * batch * q_heads * q_len * head_dim * e
