/* One instantiation of the packed-panel product of wide.h (included once per ISA and dtype).
 *
 * Defined by the includer: FBW_T (float or double), FBW_VEC (1: GCC vectors of FBW_L lanes;
 * 0: plain C, left to the compiler), FBW_L (lanes; a panel is 2*FBW_L columns), FBW_MRMAX
 * (batch rows per register block), FBW_SFX (name suffix), FBW_ATTR (target attribute or
 * nothing).
 * A panel is NR = 2*FBW_L output columns, stored k-major: P[k*NR + c], zero-padded past w.
 */

#define FBW_CAT_(a, b) a##b
#define FBW_CAT(a, b) FBW_CAT_(a, b)
#define FBW_FN(name) FBW_CAT(name, FBW_SFX)
#define FBW_NR (2 * FBW_L)

#if FBW_VEC
typedef FBW_T FBW_FN(fbw_vec_) __attribute__((vector_size(FBW_L * sizeof(FBW_T))));
#define FBW_V FBW_FN(fbw_vec_)
#endif

/* The epilogue of one element: the product's sum s at (r, j) of the block, then e's kind (wide.h). */
FBW_ATTR FBW_INLINE void
FBW_FN(fbw_put_)(const fbw_epi *e, FBW_T s, FBW_T *c, Py_ssize_t i)
{
    const FBW_T *a = (const FBW_T *)e->A;
    switch (e->kind) {
    case FBW_SET: c[i] = s; break;
    case FBW_INIT: c[i] = a[i] + s; break;
    default: {
        FBW_T hv = ((const FBW_T *)e->Hh)[i], d = a ? s + a[i] : s;
        FBW_T *dz = (FBW_T *)e->dZ;
        d = e->kind == FBW_DZ_TANH ? d * (1 - hv * hv) : (hv > 0 ? d : 0);
        c[i] = d;
        if (a) dz[i] = d;
        else dz[i] += d;
    }
    }
}

/* e with its arrays moved on by off elements */
FBW_ATTR FBW_INLINE fbw_epi
FBW_FN(fbw_epi_at_)(const fbw_epi *e, Py_ssize_t off)
{
    fbw_epi o = *e;
    if (o.A) o.A = (const FBW_T *)o.A + off;
    if (o.Hh) o.Hh = (const FBW_T *)o.Hh + off;
    if (o.dZ) o.dZ = (FBW_T *)o.dZ + off;
    return o;
}

FBW_ATTR FBW_INLINE void
FBW_FN(fbw_fetch_)(const FBW_T *p, int n, int write)
{
    if (write) { __builtin_prefetch(p, 1); __builtin_prefetch(p + n - 1, 1); }
    else { __builtin_prefetch(p); __builtin_prefetch(p + n - 1); }
}

/* C[r, 0:nv] = e(sum_k X[r, k] * P[k, 0:nv]) for r < MR, the epilogue's arrays offset by r * e->ld
 * (here: the block's first row and column); MR is a constant after inlining, so the accumulators
 * stay in registers (2*MR vectors). */
FBW_ATTR FBW_INLINE void
FBW_FN(fbw_block_)(const int MR, Py_ssize_t K, const FBW_T *X, Py_ssize_t ldx,
                   const FBW_T *P, const fbw_epi *e, FBW_T *C, Py_ssize_t ldc, int nv)
{
#if FBW_VEC
    FBW_V a0[FBW_MRMAX], a1[FBW_MRMAX];
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) { a0[r] = (FBW_V){0}; a1[r] = (FBW_V){0}; }
    for (Py_ssize_t k = 0; k < K; k++) {
        FBW_V w0 = *(const FBW_V *)(P + k * FBW_NR);
        FBW_V w1 = *(const FBW_V *)(P + k * FBW_NR + FBW_L);
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            FBW_T x = X[r * ldx + k];
            a0[r] += x * w0;
            a1[r] += x * w1;
        }
    }
    Py_ssize_t ld = e->ld;          /* read after the loop: no registers held across it */
    const FBW_T *A = (const FBW_T *)e->A;
    const FBW_T *Hh = (const FBW_T *)e->Hh;
    FBW_T *dZ = (FBW_T *)e->dZ;
    int kind = e->kind;
    if (nv == FBW_NR && kind >= FBW_DZ_TANH) {
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            FBW_V d0 = a0[r], d1 = a1[r], h0, h1, g0, g1, z0, z1;
            FBW_T *c = C + r * ldc, *z = dZ + r * ld;
            if (A) {
                memcpy(&g0, A + r * ld, sizeof(FBW_V));
                memcpy(&g1, A + r * ld + FBW_L, sizeof(FBW_V));
                d0 = d0 + g0;
                d1 = d1 + g1;
            }
            memcpy(&h0, Hh + r * ld, sizeof(FBW_V));
            memcpy(&h1, Hh + r * ld + FBW_L, sizeof(FBW_V));
            if (kind == FBW_DZ_TANH) {
                d0 = d0 * (1 - h0 * h0);
                d1 = d1 * (1 - h1 * h1);
            } else {                /* relu: d where h > 0, else 0 (the compare's mask as bits) */
                d0 = (FBW_V)((__typeof__(h0 > 0))d0 & (h0 > 0));
                d1 = (FBW_V)((__typeof__(h1 > 0))d1 & (h1 > 0));
            }
            memcpy(c, &d0, sizeof(FBW_V));
            memcpy(c + FBW_L, &d1, sizeof(FBW_V));
            if (!A) {
                memcpy(&z0, z, sizeof(FBW_V));
                memcpy(&z1, z + FBW_L, sizeof(FBW_V));
                d0 = z0 + d0;
                d1 = z1 + d1;
            }
            memcpy(z, &d0, sizeof(FBW_V));
            memcpy(z + FBW_L, &d1, sizeof(FBW_V));
        }
        return;
    }
    if (nv == FBW_NR) {   /* whole panels: vector loads and stores (memcpy: unaligned) */
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            FBW_T *c = C + r * ldc;
            if (kind == FBW_INIT) {
                FBW_V s0, s1;
                memcpy(&s0, A + r * ld, sizeof(FBW_V));
                memcpy(&s1, A + r * ld + FBW_L, sizeof(FBW_V));
                a0[r] += s0;
                a1[r] += s1;
            }
            memcpy(c, &a0[r], sizeof(FBW_V));
            memcpy(c + FBW_L, &a1[r], sizeof(FBW_V));
        }
        return;
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) {
        FBW_T out[FBW_NR];
        fbw_epi er = FBW_FN(fbw_epi_at_)(e, r * ld);
        memcpy(out, &a0[r], sizeof(FBW_V));
        memcpy(out + FBW_L, &a1[r], sizeof(FBW_V));
        for (int j = 0; j < nv; j++) FBW_FN(fbw_put_)(&er, out[j], C + r * ldc, j);
    }
#else
    FBW_T a[FBW_MRMAX][FBW_NR];
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < FBW_NR; j++) a[r][j] = 0;
    for (Py_ssize_t k = 0; k < K; k++) {
        const FBW_T *w = P + k * FBW_NR;
        for (int r = 0; r < MR; r++) {
            FBW_T x = X[r * ldx + k];
            for (int j = 0; j < FBW_NR; j++) a[r][j] += x * w[j];
        }
    }
    for (int r = 0; r < MR; r++) {
        fbw_epi er = FBW_FN(fbw_epi_at_)(e, r * e->ld);
        for (int j = 0; j < nv; j++) FBW_FN(fbw_put_)(&er, a[r][j], C + r * ldc, j);
    }
#endif
}

/* One function per block height: its loop gets every register (inlined into the panel loop below,
 * GCC kept that loop's counters in them and spilled the loop's row offsets). */
#define FBW_BLOCK(m)                                                                               \
    FBW_ATTR __attribute__((noinline)) static void                                                 \
    FBW_CAT(FBW_FN(fbw_block_), m)(Py_ssize_t K, const FBW_T *X, Py_ssize_t ldx, const FBW_T *P,    \
                                   const fbw_epi *e, FBW_T *C, Py_ssize_t ldc, int nv)             \
    { FBW_FN(fbw_block_)(m, K, X, ldx, P, e, C, ldc, nv); }
#if FBW_MRMAX > 6              /* the block heights of this loop */
#define FBW_HEIGHTS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12)
#elif FBW_MRMAX > 4
#define FBW_HEIGHTS(X) X(1) X(2) X(3) X(4) X(5) X(6)
#else
#define FBW_HEIGHTS(X) X(1) X(2) X(3) X(4)
#endif
FBW_HEIGHTS(FBW_BLOCK)
#undef FBW_BLOCK

/* C (B, w) = e(X (B, K) . W[:, j0:j0+w]), W packed by fbw_pack_* into P (panels of NR); the
 * epilogue's arrays (wide.h) are (B, w) blocks of row stride e->ld. Each panel (K*NR elements)
 * is read from cache once per group of up to FBW_MRMAX batch rows. */
FBW_ATTR static void
FBW_FN(fbw_product_)(Py_ssize_t B, Py_ssize_t K, const FBW_T *X, Py_ssize_t ldx, const FBW_T *P,
                     Py_ssize_t w, const fbw_epi *e, FBW_T *C, Py_ssize_t ldc)
{
    Py_ssize_t groups = (B + FBW_MRMAX - 1) / FBW_MRMAX;
    for (Py_ssize_t q = 0; q * FBW_NR < w; q++) {
        const FBW_T *Pq = P + q * K * FBW_NR;
        int nv = (int)(w - q * FBW_NR < FBW_NR ? w - q * FBW_NR : FBW_NR);
        Py_ssize_t b = 0;
        for (Py_ssize_t g = 0; g < groups; g++) {       /* near-equal groups: 20 rows -> 10 + 10 */
            int mr = (int)(B / groups + (g < B % groups ? 1 : 0));
            const FBW_T *x = X + b * ldx;
            FBW_T *c = C + b * ldc + q * FBW_NR;
            fbw_epi eb = FBW_FN(fbw_epi_at_)(e, b * e->ld + q * FBW_NR);
            for (int r = 0; r < mr; r++) {  /* the epilogue's rows: fetched while the block runs */
                if (eb.A) FBW_FN(fbw_fetch_)((const FBW_T *)eb.A + r * eb.ld, nv, 0);
                if (eb.Hh) FBW_FN(fbw_fetch_)((const FBW_T *)eb.Hh + r * eb.ld, nv, 0);
                if (eb.dZ) FBW_FN(fbw_fetch_)((const FBW_T *)eb.dZ + r * eb.ld, nv, 1);
            }
            switch (mr) {
#define FBW_CASE(m) case m: FBW_CAT(FBW_FN(fbw_block_), m)(K, x, ldx, Pq, &eb, c, ldc, nv); break;
            FBW_HEIGHTS(FBW_CASE)
#undef FBW_CASE
            default: break;
            }
            b += mr;
        }
    }
}

#undef FBW_HEIGHTS
#undef FBW_V
#undef FBW_NR
#undef FBW_FN
#undef FBW_CAT
#undef FBW_CAT_
