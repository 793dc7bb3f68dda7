"""Triton kernels behind rempd.model.paged_attention. Imported only where Triton is installed.

Triton compiles a kernel once per combination of specializations: each integer argument equal to 1, divisible by
16 or neither, and each pointer's 16-byte alignment. The start-up warm-up runs every alignment of the packed step
metadata (worker_pool/kernel_warmup.py). The block table's width and the split count change from step to step (a
256-token prompt's table is 16 blocks wide), so they are not specialized. Otherwise each alignment met with such a
width compiled the attention kernel while serving: 4x H100, 7B, requests behind it waited 0.4-1.5 s for their
first token."""
import os

import triton
import triton.language as tl


@triton.jit
def store_kv(k_ptr, v_ptr, k_cache, v_cache, slots, stride_k, stride_v, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """One program per new token: its K and V rows go to cache slot `slots[t]`; slot -1 is padding."""
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        inside = offs < WIDTH
        k = tl.load(k_ptr + t * stride_k + offs, mask=inside)
        v = tl.load(v_ptr + t * stride_v + offs, mask=inside)
        tl.store(k_cache + slot * WIDTH + offs, k, mask=inside)
        tl.store(v_cache + slot * WIDTH + offs, v, mask=inside)


@triton.jit
def _attend_keys(q, k_cache, v_cache, block_tables, seq, kv_head, start, end, position, d, d_ok, m_i, l_i, acc,
                 scale, stride_cb, stride_cs, stride_ch, stride_bt, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Keys [start, start + BLOCK_N) folded into the online softmax state (m_i, l_i, acc)."""
    n = start + tl.arange(0, BLOCK_N)
    n_ok = n < end
    block = tl.load(block_tables + seq * stride_bt + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    base = block * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_cache + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    visible = (n[None, :] <= position[:, None]) & n_ok[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at 0
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["stride_bt"])
def paged_attention(q_ptr, k_cache, v_cache, out_ptr, block_tables, query_start, context_lens, scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """Program (sequence, KV head, query tile). Keys are read straight from the paged cache, BLOCK_N at a time,
    each key's block looked up in the table; online softmax in fp32."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    PER_TILE: tl.constexpr = BLOCK_M // GROUP
    q_begin = tl.load(query_start + seq)
    q_len = tl.load(query_start + seq + 1) - q_begin
    ctx = tl.load(context_lens + seq)
    first = tile * PER_TILE
    if first < q_len:
        rows = tl.arange(0, BLOCK_M)
        token = first + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < PER_TILE * GROUP) & (token < q_len)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_rows = (q_begin + token).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        position = ctx - q_len + token  # a query sees keys up to its own position
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end = tl.minimum(ctx, ctx - q_len + first + PER_TILE)  # past the tile's last query nothing is visible
        if INTERPRET:  # the interpreter cannot take a loaded bound in range(); compiled code wants the for loop
            start = 0
            while start < end:
                m_i, l_i, acc = _attend_keys(q, k_cache, v_cache, block_tables, seq, kv_head, start, end, position,
                                             d, d_ok, m_i, l_i, acc, scale, stride_cb, stride_cs, stride_ch,
                                             stride_bt, BLOCK_SIZE, BLOCK_N, IEEE)
                start += BLOCK_N
        else:
            for start in range(0, end, BLOCK_N):
                m_i, l_i, acc = _attend_keys(q, k_cache, v_cache, block_tables, seq, kv_head, start, end, position,
                                             d, d_ok, m_i, l_i, acc, scale, stride_cb, stride_cs, stride_ch,
                                             stride_bt, BLOCK_SIZE, BLOCK_N, IEEE)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["stride_bt"])
def paged_decode_split(q_ptr, k_cache, v_cache, part_acc, part_ml, block_tables, query_start, context_lens, scale,
                       stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                       BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PART: tl.constexpr, IEEE: tl.constexpr):
    """Split-KV decode (one query per sequence): program (sequence, KV head, split) folds keys
    [split * PART, (split + 1) * PART) into a partial softmax state for the heads of the group: unnormalised
    acc into part_acc[seq, head, split], running max and sum into part_ml[seq, head, split, 0:2]."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    q_row = tl.load(query_start + seq)
    ctx = tl.load(context_lens + seq)
    start = split * PART
    if (start < ctx) & (tl.load(query_start + seq + 1) > q_row):
        rows = tl.arange(0, BLOCK_M)
        head = kv_head * GROUP + rows
        row_ok = rows < GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + q_row.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        position = tl.zeros([BLOCK_M], tl.int64) + ctx - 1
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end = tl.minimum(ctx, start + PART)
        for i in range(PART // BLOCK_N):  # a static trip count: keys past `end` are masked out
            m_i, l_i, acc = _attend_keys(q, k_cache, v_cache, block_tables, seq, kv_head, start + i * BLOCK_N, end,
                                         position, d, d_ok, m_i, l_i, acc, scale, stride_cb, stride_cs, stride_ch,
                                         stride_bt, BLOCK_SIZE, BLOCK_N, IEEE)
        at = (seq * tl.num_programs(1) * GROUP + head).to(tl.int64) * splits + split
        tl.store(part_acc + at[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_ml + at * 2, m_i, mask=row_ok)
        tl.store(part_ml + at * 2 + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["splits"])
def paged_decode_combine(part_acc, part_ml, out_ptr, query_start, context_lens, splits, stride_ot, stride_oh,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_S: tl.constexpr, PART: tl.constexpr):
    """Program (sequence, head): the splits that saw keys, rescaled to their common max and normalised."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start + seq)
    if tl.load(query_start + seq + 1) > q_row:
        used = (tl.load(context_lens + seq) + PART - 1) // PART
        s = tl.arange(0, BLOCK_S)
        s_ok = s < used
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        at = (seq * HEADS + head).to(tl.int64) * splits + s
        m = tl.load(part_ml + at * 2, mask=s_ok, other=float("-inf"))
        l_s = tl.load(part_ml + at * 2 + 1, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        weight = tl.where(s_ok, tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max)), 0.0)
        acc = tl.load(part_acc + at[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        total = tl.sum(weight * l_s, 0)
        out = tl.sum(weight[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
                 mask=d_ok)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
