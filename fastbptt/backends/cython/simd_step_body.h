/* One instance of the small-batch recurrence kernels (see simd_step.h), for one element type and
 * one instruction set. simd_step.h includes this file once per (ISA, dtype) with
 *   FB_T      float or double
 *   FB_SFX    the name suffix, e.g. _f32_avx512
 *   FB_VBYTES the vector width in bytes (64, 32 or 16)
 *   FB_BUDGET the most accumulators a tile keeps in registers (rows x blocks)
 *   FB_IT     the integer type of FB_T's size (int32_t or int64_t)
 *   FB_VTANH  optional: glibc's vector tanh for this vector type
 * under a `#pragma GCC target` for that ISA, so one source serves every path.
 */

#define FB_CAT_(a, b) a##b
#define FB_CAT(a, b) FB_CAT_(a, b)
#define FB_N(name) FB_CAT(name, FB_SFX)
#define FB_V FB_N(fb_vec)
#define FB_IV FB_N(fb_ivec)
#define FB_VL ((ptrdiff_t)(FB_VBYTES / sizeof(FB_T)))

typedef FB_T FB_V __attribute__((vector_size(FB_VBYTES)));
typedef FB_IT FB_IV __attribute__((vector_size(FB_VBYTES)));

static inline __attribute__((always_inline)) FB_V FB_N(fb_load)(const FB_T *p) {
    FB_V v;
    memcpy(&v, p, sizeof v);        /* an unaligned vector load */
    return v;
}

/* f(a + z) on one vector: relu, or tanh where the build has glibc's vector tanh (FB_VTANH: the same
 * libmvec functions as kernels.pyx's fastbptt_tanhf/d); without it tanh is left to the caller. */
static inline __attribute__((always_inline)) FB_V FB_N(fb_act)(FB_V s, int act) {
    if (act != 0) {
        FB_IV keep = (FB_IV)(s > (FB_V){0});          /* as kernels.pyx: h > 0 ? h : 0 */
        return (FB_V)((FB_IV)s & keep);
    }
#ifdef FB_VTANH
    return FB_VTANH(s);
#else
    return s;
#endif
}

/* Z[b, 0:NJ*VL] = sum_i X[b, i] * W[i, 0:NJ*VL] for b < NB: NB rows x NJ vector blocks of outputs in
 * registers, KU independent partial sums over i so that at least ~8 FMA chains are in flight
 * (a single chain waits on the FMA latency at small H). With A (the forward), Z = f(A + X.W)
 * instead, and the tile's last block holds only `last` columns (the rest is neither read nor
 * written); without A every block is stored whole. */
#define FB_TILE(FWD, NB, NJ)                                                                          \
static void FB_N(fb_tile_##FWD##_##NB##_##NJ)(ptrdiff_t H, const FB_T *X, ptrdiff_t ldx,              \
                                              const FB_T *W, ptrdiff_t ldw, FB_T *Z,                  \
                                              ptrdiff_t ldz, const FB_T *A, ptrdiff_t lda,            \
                                              int act, ptrdiff_t last) {                              \
    enum { KU = (NB) * (NJ) >= 8 ? 1 : (NB) * (NJ) >= 4 ? 2 : (NB) * (NJ) >= 2 ? 4 : 8 };             \
    FB_V acc[KU][NB][NJ];                                                                             \
    for (int k = 0; k < KU; k++)                                                                      \
        for (int b = 0; b < (NB); b++)                                                                \
            for (int j = 0; j < (NJ); j++) acc[k][b][j] = (FB_V){0};                                  \
    ptrdiff_t i = 0;                                                                                  \
    for (; i + KU <= H; i += KU) {                                                                    \
        for (int k = 0; k < KU; k++) {                                                                \
            const FB_T *w = W + (i + k) * ldw;                                                        \
            FB_V wv[NJ];                                                                              \
            for (int j = 0; j < (NJ); j++) wv[j] = FB_N(fb_load)(w + j * FB_VL);                      \
            for (int b = 0; b < (NB); b++) {                                                          \
                FB_T xb = X[b * ldx + i + k];                                                         \
                for (int j = 0; j < (NJ); j++) acc[k][b][j] += xb * wv[j];                            \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    for (; i < H; i++) {                                                                              \
        const FB_T *w = W + i * ldw;                                                                  \
        for (int b = 0; b < (NB); b++) {                                                              \
            FB_T xb = X[b * ldx + i];                                                                 \
            for (int j = 0; j < (NJ); j++) acc[0][b][j] += xb * FB_N(fb_load)(w + j * FB_VL);         \
        }                                                                                             \
    }                                                                                                 \
    for (int b = 0; b < (NB); b++)                                                                    \
        for (int j = 0; j < (NJ); j++) {                                                              \
            FB_V s = acc[0][b][j];                                                                    \
            for (int k = 1; k < KU; k++) s += acc[k][b][j];                                           \
            FB_T *z = Z + b * ldz + j * FB_VL;                                                        \
            if (!(FWD)) {           /* a tile of each kind: no spill for the forward's tanh call */   \
                memcpy(z, &s, sizeof s);                                                              \
            } else if (j < (NJ) - 1 || last == FB_VL) {                                               \
                s = FB_N(fb_act)(FB_N(fb_load)(A + b * lda + j * FB_VL) + s, act);                    \
                memcpy(z, &s, sizeof s);                                                              \
            } else {                /* a partial last block: only its `last` columns exist */         \
                FB_V a = (FB_V){0};                                                                   \
                memcpy(&a, A + b * lda + j * FB_VL, (size_t)last * sizeof(FB_T));                     \
                s = FB_N(fb_act)(a + s, act);                                                         \
                memcpy(z, &s, (size_t)last * sizeof(FB_T));                                           \
            }                                                                                         \
        }                                                                                             \
}

#define FB_TILES(FWD)                                                                                 \
    FB_TILE(FWD, 1, 1) FB_TILE(FWD, 1, 2) FB_TILE(FWD, 1, 4) FB_TILE(FWD, 1, 8)                       \
    FB_TILE(FWD, 2, 1) FB_TILE(FWD, 2, 2) FB_TILE(FWD, 2, 4) FB_TILE(FWD, 2, 8)                       \
    FB_TILE(FWD, 3, 1) FB_TILE(FWD, 3, 2) FB_TILE(FWD, 3, 4) FB_TILE(FWD, 3, 8)                       \
    FB_TILE(FWD, 4, 1) FB_TILE(FWD, 4, 2) FB_TILE(FWD, 4, 4) FB_TILE(FWD, 4, 8)
FB_TILES(0)
FB_TILES(1)
#undef FB_TILES

/* One row (batch 1) over all NJ blocks in one pass: as FB_TILE with NB = 1, but x[i] is broadcast
 * once per i for every block (FB_TILE's blocks of 4, 2 and 1 at H = 100 each ran the loop over i). */
#define FB_ROW(FWD, NJ)                                                                               \
static void FB_N(fb_row_##FWD##_##NJ)(ptrdiff_t H, const FB_T *X, const FB_T *W, ptrdiff_t ldw,      \
                                      FB_T *Z, const FB_T *A, int act, ptrdiff_t last) {              \
    enum { KU = (NJ) >= 8 ? 1 : (NJ) >= 4 ? 2 : (NJ) >= 2 ? 4 : 8 };                                  \
    FB_V acc[KU][NJ];                                                                                 \
    for (int k = 0; k < KU; k++)                                                                      \
        for (int j = 0; j < (NJ); j++) acc[k][j] = (FB_V){0};                                         \
    ptrdiff_t i = 0;                                                                                  \
    for (; i + KU <= H; i += KU) {                                                                    \
        for (int k = 0; k < KU; k++) {                                                                \
            FB_T xb = X[i + k];                                                                       \
            for (int j = 0; j < (NJ); j++)                                                            \
                acc[k][j] += xb * FB_N(fb_load)(W + (i + k) * ldw + j * FB_VL);                       \
        }                                                                                             \
    }                                                                                                 \
    for (; i < H; i++) {                                                                              \
        FB_T xb = X[i];                                                                               \
        for (int j = 0; j < (NJ); j++) acc[0][j] += xb * FB_N(fb_load)(W + i * ldw + j * FB_VL);      \
    }                                                                                                 \
    for (int j = 0; j < (NJ); j++) {                                                                  \
        FB_V s = acc[0][j];                                                                           \
        for (int k = 1; k < KU; k++) s += acc[k][j];                                                  \
        FB_T *z = Z + j * FB_VL;                                                                      \
        if (!(FWD)) {                                                                                 \
            memcpy(z, &s, sizeof s);                                                                  \
        } else if (j < (NJ) - 1 || last == FB_VL) {                                                   \
            s = FB_N(fb_act)(FB_N(fb_load)(A + j * FB_VL) + s, act);                                  \
            memcpy(z, &s, sizeof s);                                                                  \
        } else {                                                                                      \
            FB_V a = (FB_V){0};                                                                       \
            memcpy(&a, A + j * FB_VL, (size_t)last * sizeof(FB_T));                                   \
            s = FB_N(fb_act)(a + s, act);                                                             \
            memcpy(z, &s, (size_t)last * sizeof(FB_T));                                               \
        }                                                                                             \
    }                                                                                                 \
}

#define FB_ROWS(FWD)                                                                                  \
    FB_ROW(FWD, 2) FB_ROW(FWD, 3) FB_ROW(FWD, 4) FB_ROW(FWD, 5) FB_ROW(FWD, 6) FB_ROW(FWD, 7)        \
    FB_ROW(FWD, 8)
FB_ROWS(0)
FB_ROWS(1)
#undef FB_ROWS

/* Z (n, ldz) = X (n, ldx) . W over ceil(H/VL) blocks of VL columns, W the aligned copy of
 * fb_prepare (H rows ldw = ceil(H/VL)*VL apart, zero beyond column H), so every load of W is a whole,
 * aligned vector. Without A, every store is whole too (ldz >= ldw); with A (lda), Z = f(A + X.W)
 * over exactly H columns (see the tiles). */
static void FB_N(fb_mv)(ptrdiff_t n, ptrdiff_t H, const FB_T *X, ptrdiff_t ldx, const FB_T *W,
                        ptrdiff_t ldw, FB_T *Z, ptrdiff_t ldz, const FB_T *A, ptrdiff_t lda, int act) {
    ptrdiff_t nblocks = ldw / FB_VL, tail = H - (nblocks - 1) * FB_VL;
    if (n == 1 && nblocks >= 2 && nblocks <= 8 && nblocks <= FB_BUDGET) {
        switch ((int)nblocks * 2 + (A != NULL)) {
#define FB_RCASE(NJ) \
            case (NJ) * 2 + 1: FB_N(fb_row_1_##NJ)(H, X, W, ldw, Z, A, act, tail); break; \
            case (NJ) * 2: FB_N(fb_row_0_##NJ)(H, X, W, ldw, Z, A, act, tail); break;
            FB_RCASE(2) FB_RCASE(3) FB_RCASE(4) FB_RCASE(5) FB_RCASE(6) FB_RCASE(7) FB_RCASE(8)
#undef FB_RCASE
        }
        return;
    }
    /* the tiles of one column block for every group of rows in turn: that block of W (ldw/nj of it)
     * is read from L1 by all but the first group */
    int nj_full = 8, nb_max = n < 4 ? (int)n : 4;
    while (nj_full > 1 && nb_max * nj_full > FB_BUDGET) nj_full >>= 1;
    for (ptrdiff_t j0 = 0; j0 < nblocks;) {
        ptrdiff_t left = nblocks - j0;
        int nj = nj_full;
        while (nj > 1 && nj > left) nj >>= 1;
        for (ptrdiff_t b0 = 0; b0 < n; b0 += 4) {
            int nb = n - b0 < 4 ? (int)(n - b0) : 4;
            const FB_T *x = X + b0 * ldx;
            const FB_T *w = W + j0 * FB_VL;
            FB_T *z = Z + b0 * ldz + j0 * FB_VL;
            const FB_T *a = A ? A + b0 * lda + j0 * FB_VL : NULL;
            ptrdiff_t last = j0 + nj == nblocks ? tail : FB_VL;
            switch (nb * 16 + nj) {
#define FB_CASE(NB, NJ) case (NB) * 16 + (NJ):                                                      \
                if (a) FB_N(fb_tile_1_##NB##_##NJ)(H, x, ldx, w, ldw, z, ldz, a, lda, act, last);     \
                else FB_N(fb_tile_0_##NB##_##NJ)(H, x, ldx, w, ldw, z, ldz, a, lda, act, last);       \
                break;
            FB_CASE(1, 1) FB_CASE(1, 2) FB_CASE(1, 4) FB_CASE(1, 8)
            FB_CASE(2, 1) FB_CASE(2, 2) FB_CASE(2, 4) FB_CASE(2, 8)
            FB_CASE(3, 1) FB_CASE(3, 2) FB_CASE(3, 4) FB_CASE(3, 8)
            FB_CASE(4, 1) FB_CASE(4, 2) FB_CASE(4, 4) FB_CASE(4, 8)
#undef FB_CASE
            }
        }
        j0 += nj;
    }
}

/* The per-call buffers, in one 64-byte aligned block (*mem, to free): Wp, a copy of W (H, H) with
 * its rows ldw = ceil(H/VL)*VL apart and zero beyond column H (NumPy's arrays are 16-byte aligned:
 * read in place, most vector loads of W straddled two cache lines), and Z, rows x ldw. Returns -1
 * when out of memory. */
static int FB_N(fb_prepare)(ptrdiff_t H, ptrdiff_t rows, const FB_T *W, const FB_T **Wp, ptrdiff_t *ldw,
                            FB_T **mem, FB_T **Z) {
    ptrdiff_t ld = (H + FB_VL - 1) / FB_VL * FB_VL;
    size_t bytes = ((size_t)((H + rows) * ld) * sizeof(FB_T) + 63) / 64 * 64;
    FB_T *m = (FB_T *)aligned_alloc(64, bytes ? bytes : 64);
    if (m == NULL) return -1;
    for (ptrdiff_t i = 0; i < H; i++) {
        memcpy(m + i * ld, W + i * H, (size_t)H * sizeof(FB_T));
        for (ptrdiff_t c = H; c < ld; c++) m[i * ld + c] = 0;
    }
    *Wp = m;
    *ldw = ld;
    *mem = m;
    *Z = m + H * ld;
    return 0;
}

/* One row of a backward step (as _dz_step in kernels.pyx): delta = [carried c] + [G[t] g] (NULL:
 * absent), dz = delta * f'(from h), and dZ[t] = dz on a loss step (g given), dZ[t] += dz otherwise.
 * One pass, specialised by case (no library call per row: at H = 32 the calls were most of it). */
static inline __attribute__((always_inline)) void FB_N(fb_dz_pass)(
        ptrdiff_t H, const int has_c, const int has_g, const int act, const FB_T *restrict c,
        const FB_T *restrict g, const FB_T *restrict h, FB_T *restrict d, FB_T *restrict zt) {
    for (ptrdiff_t e = 0; e < H; e++) {
        FB_T v = (has_c ? c[e] : 0) + (has_g ? g[e] : 0), hv = h[e];
        v = act == 0 ? v * (1 - hv * hv) : (hv > 0 ? v : 0);
        d[e] = v;
        zt[e] = has_g ? v : zt[e] + v;
    }
}

static void FB_N(fb_dz_row)(ptrdiff_t H, int act, const FB_T *restrict c, const FB_T *restrict g,
                            const FB_T *restrict h, FB_T *restrict d, FB_T *restrict zt) {
    switch ((c != NULL) * 4 + (g != NULL) * 2 + (act != 0)) {
#define FB_DZ(C, G, ACT)                                                                              \
    case (C) * 4 + (G) * 2 + (ACT): FB_N(fb_dz_pass)(H, C, G, ACT, c, g, h, d, zt); break;
    FB_DZ(0, 0, 0) FB_DZ(0, 0, 1) FB_DZ(0, 1, 0) FB_DZ(0, 1, 1)
    FB_DZ(1, 0, 0) FB_DZ(1, 0, 1) FB_DZ(1, 1, 0) FB_DZ(1, 1, 1)
#undef FB_DZ
    }
}

/* The forward kernel of the contract (as _forward in kernels.pyx): rows lo..lo+B of a batch, time
 * strides sA/sH, step t on the rows still active (bs). Returns -1 (nothing written) when out of
 * memory. */
static int FB_N(fb_simd_forward)(ptrdiff_t T, ptrdiff_t B, ptrdiff_t H, const FB_T *A, ptrdiff_t sA,
                                 const FB_T *W_hhT, FB_T *Hs, ptrdiff_t sH, int act,
                                 const int64_t *bs, ptrdiff_t lo) {
    const FB_T *W;
    FB_T *mem, *Z;              /* Z: no rows (the forward stores straight into Hs) */
    ptrdiff_t ldw;
    if (FB_N(fb_prepare)(H, 0, W_hhT, &W, &ldw, &mem, &Z)) return -1;
    for (ptrdiff_t t = 0; t < T; t++) {
        ptrdiff_t n = fb_simd_active(bs, t, lo, B);
        if (n == 0) break;
        /* h_t = f(A[t] + h_{t-1}.W_hhT), in registers from the product to the store */
        FB_N(fb_mv)(n, H, Hs + t * sH, H, W, ldw, Hs + (t + 1) * sH, H, A + t * sA, H, act);
#ifndef FB_VTANH
        if (act == 0) FB_CAT(fb_simd_tanh_, FB_T)(Hs + (t + 1) * sH, n * H);
#endif
    }
    free(mem);
    return 0;
}

/* The backward kernel of the contract (as _backward in kernels.pyx, window for window): fills
 * dZ with the sum over windows of dz_t. Returns -1 (nothing written) when out of memory. */
static int FB_N(fb_simd_backward)(ptrdiff_t T, ptrdiff_t B, ptrdiff_t H, const FB_T *G, ptrdiff_t sG,
                                  const FB_T *Hs, ptrdiff_t sH, const FB_T *W_hh, ptrdiff_t n_win,
                                  const int64_t *ends, const int64_t *bp_starts, int act, FB_T *dZ,
                                  ptrdiff_t sZ, const int64_t *bs, ptrdiff_t lo) {
    const FB_T *W;
    FB_T *mem, *carried, *dz;
    ptrdiff_t ldz, loss_start = 0;
    /* Z holds 2B rows: carried (the delta from step t+1, rows ldz apart) and dz (rows H apart) */
    if (FB_N(fb_prepare)(H, 2 * B, W_hh, &W, &ldz, &mem, &carried)) return -1;
    dz = carried + B * ldz;
    for (ptrdiff_t w = 0; w < n_win; w++) {
        ptrdiff_t end = (ptrdiff_t)ends[w], bp_start = (ptrdiff_t)bp_starts[w], n_carried = 0;
        for (ptrdiff_t t = loss_start; t < bp_start; t++)      /* steps in no window: zero */
            memset(dZ + t * sZ, 0, (size_t)(B * H) * sizeof(FB_T));
        for (ptrdiff_t t = end - 1; t >= bp_start; t--) {
            ptrdiff_t n = fb_simd_active(bs, t, lo, B);
            int inject = t >= loss_start;
            /* rows at their own last step (b >= n_carried) start their delta at zero */
            for (ptrdiff_t b = 0; b < n; b++)
                FB_N(fb_dz_row)(H, act, b < n_carried ? carried + b * ldz : NULL,
                                inject ? G + t * sG + b * H : NULL, Hs + (t + 1) * sH + b * H,
                                dz + b * H, dZ + t * sZ + b * H);
            n_carried = 0;
            if (t > bp_start && n > 0) {            /* delta_{t-1} = W_hh^T dz_t: dz_t . W_hh by rows */
                FB_N(fb_mv)(n, H, dz, H, W, ldz, carried, ldz, NULL, 0, 0);
                n_carried = n;
            }
        }
        loss_start = end;
    }
    for (ptrdiff_t t = loss_start; t < T; t++)                 /* after the last window */
        memset(dZ + t * sZ, 0, (size_t)(B * H) * sizeof(FB_T));
    free(mem);
    return 0;
}

#undef FB_TILE
#undef FB_ROW
#undef FB_VTANH
#undef FB_T
#undef FB_IT
#undef FB_SFX
#undef FB_VL
#undef FB_V
#undef FB_IV
#undef FB_N
#undef FB_CAT
#undef FB_CAT_
