"""The Triton kernels behind :mod:`sparse_dict._torch.fused`.

Imported only where a kernel may run (a CUDA GPU, or Triton's interpreter
in the tests), so that the package needs no Triton elsewhere. Each kernel
is the body of one function of :mod:`~sparse_dict._torch.fused`, which
checks its arguments, chooses its blocks and documents what it computes.

Two conventions hold throughout:

* bfloat16 results are rounded to nearest even by :func:`_bfloat16`, as
  torch converts: a GPU's conversion does too, but Triton's interpreter
  (the CPU tests) truncates, and the tests compare with torch exactly;
* a (batch, n_components) mask of active codes is kept as bits, eight
  columns a byte (bit ``j`` of byte ``i`` is column ``8 i + j``): written
  once by :func:`codes_bits_count` and read once by :func:`mask_by_bits`,
  it moves 1/16 of the bytes a bfloat16 mask does.
"""

import triton
import triton.language as tl


@triton.jit
def _bfloat16(x):
    """``x`` (float32) as bfloat16, rounded to nearest even; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    near = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x == x, near, x.to(tl.bfloat16))


@triton.jit
def adam_rows(W, G, M, V, LOW, NORMS, n_rows, d, stride_w, stride_g, stride_low,
              step_size, beta1, beta2, eps, bc2_sqrt,
              PROJECT: tl.constexpr, UNIT: tl.constexpr, WRITE_LOW: tl.constexpr,
              LOW_BF16: tl.constexpr, WRITE_NORMS: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < d)
    rows64 = rows.to(tl.int64)[:, None]
    at = rows64 * stride_w + cols[None, :]
    w = tl.load(W + at, mask=inside, other=0.0)
    g = tl.load(G + rows64 * stride_g + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if PROJECT:
        # The gradient's component along the (unit) atom would only
        # change its norm, which the constraint undoes.
        g = g - tl.sum(g * w, axis=1)[:, None] * w
    m = tl.load(M + at, mask=inside, other=0.0)
    v = tl.load(V + at, mask=inside, other=0.0)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    # A GPU's fast division and square root (within 2 ulp), not the
    # correctly rounded ones torch's Adam uses: with tl.div_rn and
    # tl.sqrt_rn this kernel took 3 times as long on an H200 (853
    # against 283 us for a bf16 step's four calls at the reference
    # size). The last-bit differences grow over a run at a high learning
    # rate (1.5e-4 in W_dec after 30 steps at 0.1 there), which the GPU
    # test allows.
    w = w - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    if UNIT:
        norm = tl.sqrt(tl.sum(w * w, axis=1))
        w = w / tl.maximum(norm, 1e-12)[:, None]
    tl.store(W + at, w, mask=inside)
    if WRITE_NORMS:
        # The rows' norms as written (1 to rounding after UNIT), for the
        # next step's penalty, which would otherwise read the whole matrix.
        tl.store(NORMS + rows, tl.sqrt(tl.sum(w * w, axis=1)), mask=rows < n_rows)
    tl.store(M + at, m, mask=inside)
    tl.store(V + at, v, mask=inside)
    if WRITE_LOW:
        low = LOW + rows64 * stride_low + cols[None, :]
        if LOW_BF16:
            tl.store(low, _bfloat16(w), mask=inside)
        else:
            tl.store(low, w.to(LOW.dtype.element_ty), mask=inside)


@triton.jit
def codes_bits_count(C, BITS, FIRED, n_rows, n_cols, n_bytes, stride_c, stride_b,
                     RELU: tl.constexpr, BLOCK_R: tl.constexpr, BYTES: tl.constexpr,
                     TILES: tl.constexpr):
    # Each program takes TILES tiles of BLOCK_R rows down one block of
    # 8 * BYTES columns, seen as (rows, bytes, bits) so that each byte's
    # eight columns are summed into it in registers. The counts accumulate
    # element-wise and are summed down the rows once, at the end, before one
    # atomic add per column: a sum across threads in every tile (an earlier
    # version) cost the kernel its lead over torch's passes in bfloat16 on
    # an H200.
    byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    cols = byte[:, None] * 8 + bit[None, :]
    weight = (bit * 0 + 1) << bit  # 1, 2, 4, ..., 128
    first = tl.program_id(1) * (TILES * BLOCK_R)
    acc = tl.zeros([BLOCK_R, BYTES, 8], dtype=tl.float32)
    for tile in range(TILES):
        rows = first + tile * BLOCK_R + tl.arange(0, BLOCK_R)
        rows64 = rows.to(tl.int64)
        inside = (rows[:, None, None] < n_rows) & (cols[None, :, :] < n_cols)
        at = rows64[:, None, None] * stride_c + cols[None, :, :]
        # Compared in float32: Triton's interpreter (3.9) compares bfloat16
        # as its raw bits, so that every negative value counted as positive.
        c = tl.load(C + at, mask=inside, other=0.0).to(tl.float32)
        if RELU:
            # NaN stays NaN, as in torch's relu, so that a diverging step
            # still shows in its loss.
            c = tl.where(c < 0.0, 0.0, c)
            tl.store(C + at, c.to(C.dtype.element_ty), mask=inside)
        on = c > 0.0
        acc += tl.where(on, 1.0, 0.0)
        packed = tl.sum(tl.where(on, weight[None, None, :], 0), axis=2)
        tl.store(BITS + rows64[:, None] * stride_b + byte[None, :], packed.to(tl.uint8),
                 mask=(rows[:, None] < n_rows) & (byte[None, :] < n_bytes))
    tl.atomic_add(FIRED + cols, tl.sum(acc, axis=0), mask=cols < n_cols)


@triton.jit
def mask_by_bits(G, BITS, n_rows, n_cols, n_bytes, stride_g, stride_b,
                 BLOCK_R: tl.constexpr, BYTES: tl.constexpr):
    byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    cols = byte[:, None] * 8 + bit[None, :]
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    packed = tl.load(BITS + rows64[:, None] * stride_b + byte[None, :],
                     mask=(rows[:, None] < n_rows) & (byte[None, :] < n_bytes), other=0)
    keep = ((packed.to(tl.int32)[:, :, None] >> bit[None, None, :]) & 1).to(tl.float32)
    inside = (rows[:, None, None] < n_rows) & (cols[None, :, :] < n_cols)
    at = rows64[:, None, None] * stride_g + cols[None, :, :]
    g = tl.load(G + at, mask=inside, other=0.0)
    # A product with 0 or 1, as torch's mul_ by a 0/1 mask: exact, and a
    # NaN gradient stays NaN.
    tl.store(G + at, (g.to(tl.float32) * keep).to(G.dtype.element_ty), mask=inside)


@triton.jit
def centre(X, B, OUT, n_rows, d, stride_x, stride_out, OUT_BF16: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)[:, None]
    inside = (rows[:, None] < n_rows) & (cols[None, :] < d)
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=inside, other=0.0)
    b = tl.load(B + cols, mask=cols < d, other=0.0)
    # In float32, then rounded once, as torch's subtraction into a
    # lower-precision output.
    c = x - b[None, :]
    at = OUT + rows64 * stride_out + cols[None, :]
    if OUT_BF16:
        tl.store(at, _bfloat16(c), mask=inside)
    else:
        tl.store(at, c.to(OUT.dtype.element_ty), mask=inside)


@triton.jit
def residual(Y, B, X, GX, ERR, SSE, GSUM, n_rows, d, stride_y, stride_x, stride_gx, stride_err,
             scale, GX_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
             TILES: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.load(B + cols, mask=cols < d, other=0.0)
    first = tl.program_id(1) * (TILES * BLOCK_R)
    squares = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    sums = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for tile in range(TILES):
        rows = first + tile * BLOCK_R + tl.arange(0, BLOCK_R)
        rows64 = rows.to(tl.int64)[:, None]
        inside = (rows[:, None] < n_rows) & (cols[None, :] < d)
        y = tl.load(Y + rows64 * stride_y + cols[None, :], mask=inside, other=0.0)
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=inside, other=0.0)
        # In the plain operations' order: (x_hat + b_dec) - x in float32.
        e = (y.to(tl.float32) + b[None, :]) - x
        e = tl.where(inside, e, 0.0)
        tl.store(ERR + rows64 * stride_err + cols[None, :], e, mask=inside)
        g = e * scale
        if GX_BF16:
            low = _bfloat16(g)
            tl.store(GX + rows64 * stride_gx + cols[None, :], low, mask=inside)
            g = low.to(tl.float32)
        else:
            tl.store(GX + rows64 * stride_gx + cols[None, :], g, mask=inside)
        squares += e * e
        sums += g
    tl.atomic_add(SSE, tl.sum(tl.sum(squares, axis=1), axis=0))
    tl.atomic_add(GSUM + cols, tl.sum(sums, axis=0), mask=cols < d)


@triton.jit
def penalty_stats(CS, FIRED, W, SSE, STATS, BIAS, n, stride_cs, stride_bias, batch,
                  coef, bias_scale, l0_factor, HAS_W: tl.constexpr, BIAS_BF16: tl.constexpr,
                  BLOCK: tl.constexpr):
    # One block of the features a program. The code sums are a column of a
    # product (one cache line an element): one program looping over all of
    # them waited on each load in turn (54 us a step for 24,576 features on
    # an H200, as long as torch's dozen launches). Every statistic is a sum
    # over the features, so each program adds its block's share into STATS
    # (zeroed by the caller), and the first adds the squared error's.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    cs = tl.load(CS + i.to(tl.int64) * stride_cs, mask=inside, other=0.0).to(tl.float32)
    fired = tl.load(FIRED + i, mask=inside, other=0.0)
    if HAS_W:
        w = tl.load(W + i, mask=inside, other=0.0)
        weighted = tl.sum(cs * w, axis=0)
        bias = w * bias_scale
    else:
        weighted = 0.0
        bias = tl.zeros([BLOCK], dtype=tl.float32)
    at = BIAS + i.to(tl.int64) * stride_bias
    if BIAS_BF16:
        tl.store(at, _bfloat16(bias), mask=inside)
    else:
        tl.store(at, bias.to(BIAS.dtype.element_ty), mask=inside)
    l1 = tl.sum(cs, axis=0) / batch
    l0 = tl.sum(fired, axis=0) / batch
    penalty = weighted / batch + l0 * l0_factor
    mse = tl.where(tl.program_id(0) == 0, tl.load(SSE) / batch, 0.0)
    tl.atomic_add(STATS + 0, mse + coef * penalty)
    tl.atomic_add(STATS + 1, mse)
    tl.atomic_add(STATS + 2, l1)
    tl.atomic_add(STATS + 3, l0)


@triton.jit
def tally(FIRED, TOTAL, SINCE, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    fired = tl.load(FIRED + i, mask=inside, other=0.0)
    total = tl.load(TOTAL + i, mask=inside, other=0.0)
    since = tl.load(SINCE + i, mask=inside, other=0)
    # float32 counts widened and added in float64, as torch's in-place add.
    tl.store(TOTAL + i, total + fired.to(tl.float64), mask=inside)
    tl.store(SINCE + i, tl.where(fired > 0.0, 0, since + 1), mask=inside)
