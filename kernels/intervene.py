"""intervene in Triton: one program per output row segment of one intervention (and channel).

Two layouts of the output, chosen by the wrapper:
* planar (NCHW, CL=False): program (pid0, pid1) writes out[k, c, i, j0:j0+BLOCK_W] with pid0 = (k * C + c) * wh + i
  and j0 = pid1 * BLOCK_W: the row segment is contiguous in memory;
* channels-last (CL=True): program (pid0, pid1) writes the row elements t0:t0+BLOCK_W of out[k, :, i, :] in memory
  order, t = j * C + c, with pid0 = k * wh + i: contiguous, coalesced stores instead of stores C apart.
Axis 0 allows 2^31 - 1 programs, so K above 65,535 is fine; the per-program indices are divided once per program,
per element only by the constant C. Each pixel reads the base input at (window origin + (i, j)); pixels inside the
replaced block take the patch value instead, with the task's degradation (integer DN noise, DR rain re-add). Values
/ 255 come from a 256-entry table so that every backend rounds identically.
"""
import triton
import triton.language as tl

from ._rng import _gaussian12, _stream_key


# seed: the JIT specialises an integer argument equal to 1 into a constant, on which _stream_key's seed.to()
# fails; the seed changes per run anyway, so a specialisation would only cost compilations.
@triton.jit(do_not_specialize=["seed"])
def _intervene_kernel(out_ptr, base_ptr, patch_ptr, idx_ptr, org_ptr, size_ptr, win_ptr, ids_ptr, rain_ptr,
                      lut_ptr, seed, sigma_q, C: tl.constexpr, h, w, wh, ww, pb, P,
                      s_ok, s_oc, s_oh, s_ow,
                      NOISY: tl.constexpr, RAINY: tl.constexpr, BLOCK_W: tl.constexpr, CL: tl.constexpr):
    pid0 = tl.program_id(0).to(tl.int64)
    i = pid0 % wh
    lane = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    if CL:
        k = pid0 // wh
        j = lane // C  # C is a constant: a multiply and shift, not a division
        c = lane % C
        in_row = lane < ww * C
    else:
        c = (pid0 // wh) % C + 0 * lane  # as a vector, like the channels-last case
        k = pid0 // (wh * C)
        j = lane
        in_row = j < ww
    gy = tl.load(win_ptr + 2 * k) + i + 0 * j   # input row of this output row, as a vector (the interpreter
    #                                           # refuses vector & scalar masks)
    gx = tl.load(win_ptr + 2 * k + 1) + j       # input columns
    # The wrappers check every index before a launch; these masks keep a compiled graph's launch (whose values
    # nothing read) inside the buffers all the same: reads outside the base or the bank are never issued
    in_base = in_row & (gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)
    v = tl.load(base_ptr + (c * h + gy) * w + gx, mask=in_base, other=0.0)
    dy = gy - tl.load(org_ptr + 2 * k)
    dx = gx - tl.load(org_ptr + 2 * k + 1)
    inside = in_base & (dy >= 0) & (dy < tl.load(size_ptr + 2 * k)) & (dx >= 0) & (dx < tl.load(size_ptr + 2 * k + 1))
    p = tl.load(idx_ptr + k)
    p_lane = p + 0 * j  # as a vector: the interpreter refuses vector & scalar masks
    inside = inside & (dy < pb) & (dx < pb) & (p_lane >= 0) & (p_lane < P)
    pv = tl.load(patch_ptr + ((p * C + c) * pb + dy) * pb + dx, mask=inside, other=0).to(tl.int64)
    if NOISY:
        key = _stream_key(seed, tl.load(ids_ptr + k))
        counter = ((c * pb + dy) * pb + dx).to(tl.uint32)
        total = pv * 16777216 + _gaussian12(key, counter) * sigma_q
        pv = tl.minimum(tl.maximum(total >> 24, 0), 255)  # arithmetic shift: floor, then clip
    if RAINY:
        r = tl.load(rain_ptr + (c * h + gy) * w + gx, mask=inside, other=0.0)
        pv = tl.floor(tl.minimum(pv.to(tl.float32) + r, 255.0)).to(tl.int64)
    pval = tl.load(lut_ptr + tl.minimum(tl.maximum(pv, 0), 255), mask=inside, other=0.0)
    res = tl.where(inside, pval, v)
    tl.store(out_ptr + k * s_ok + c * s_oc + i * s_oh + j * s_ow, res.to(out_ptr.dtype.element_ty), mask=in_row)
