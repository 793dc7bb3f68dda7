"""Triton kernels behind rempd.model.fused_ops: the small per-layer ops of a step, each in one launch instead of
several PyTorch kernels. Math in float32, rounding to the model's dtype where the PyTorch reference rounds, so
float32 models give the reference's numbers up to summation order. Imported only where Triton is installed."""
import triton
import triton.language as tl


@triton.jit
def rms_norm(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, rows_ptr, eps, stride_x, stride_r,
             stride_o, stride_n, WIDTH: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
             HAS_ROWS: tl.constexpr):
    """Program i normalises row rows[i] (or i) of x, after adding the same row of the residual when given; the
    sum is written to new_residual row i, as the model dtype holds it, and normalised from that rounding."""
    i = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i
    offs = tl.arange(0, BLOCK)
    ok = offs < WIDTH
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + i * stride_n + offs, x, mask=ok)
    x = x.to(tl.float32)
    mean_square = tl.sum(x * x, 0) / WIDTH
    y = (x * tl.rsqrt(mean_square + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + i * stride_o + offs, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def rotary_store(qkv_ptr, positions, cos_ptr, sin_ptr, slots, k_cache, v_cache, stride_t, stride_c,
                 Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Program (token, head tile) over the token's q heads then k heads, packed at the start of its qkv row:
    q heads are rotated in place; k heads are rotated into cache slot `slots[t]`, and the v head of the same
    index copied beside them (slot -1: padding, nothing written). cos/sin rows are read at the token's position."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t).to(tl.int64)
    slot = tl.load(slots + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d_ok = d < HALF
    dtype = qkv_ptr.dtype.element_ty
    # the reference casts the table to the model dtype before multiplying
    cos = tl.load(cos_ptr + pos * stride_c + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_c + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)[None, :]
    row = qkv_ptr + t * stride_t
    first = row + h[:, None] * (2 * HALF) + d[None, :]
    q_mask = (h < Q_HEADS)[:, None] & d_ok[None, :]
    k_mask = ((h >= Q_HEADS) & (h < Q_HEADS + KV_HEADS))[:, None] & d_ok[None, :]
    x1 = tl.load(first, mask=q_mask | k_mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=q_mask | k_mask, other=0.0).to(tl.float32)
    r1 = (x1 * cos - x2 * sin).to(dtype)
    r2 = (x2 * cos + x1 * sin).to(dtype)
    tl.store(first, r1, mask=q_mask)
    tl.store(first + HALF, r2, mask=q_mask)
    if slot >= 0:
        at = slot * (KV_HEADS * 2 * HALF) + (h - Q_HEADS)[:, None] * (2 * HALF) + d[None, :]
        tl.store(k_cache + at, r1, mask=k_mask)
        tl.store(k_cache + at + HALF, r2, mask=k_mask)
        v = first + KV_HEADS * 2 * HALF  # v head i sits KV_HEADS heads after k head i
        tl.store(v_cache + at, tl.load(v, mask=k_mask), mask=k_mask)
        tl.store(v_cache + at + HALF, tl.load(v + HALF, mask=k_mask), mask=k_mask)


@triton.jit
def silu_mul(gate_up_ptr, out_ptr, stride_in, stride_out, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token, column tile): out = silu(gate) * up, gate and up the two halves of the token's row."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < WIDTH
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + t * stride_in + c, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + t * stride_in + WIDTH + c, mask=ok, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # the reference rounds silu's output
    tl.store(out_ptr + t * stride_out + c, (silu * up).to(dtype), mask=ok)
