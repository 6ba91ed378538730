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

/* C[r, 0:nv] = [C[r, 0:nv] +] sum_k X[r, k] * P[k, 0:nv] for r < MR; MR is a constant after
 * inlining, so the accumulators stay in registers (2*MR vectors). */
FBW_ATTR FBW_INLINE void
FBW_FN(fbw_block_)(const int MR, Py_ssize_t K, const FBW_T *X, Py_ssize_t ldx,
                   const FBW_T *P, int acc, FBW_T *C, Py_ssize_t ldc, int nv)
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
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) {
        FBW_T out[FBW_NR];
        memcpy(out, &a0[r], sizeof(FBW_V));
        memcpy(out + FBW_L, &a1[r], sizeof(FBW_V));
        FBW_T *c = C + r * ldc;
        if (acc) for (int j = 0; j < nv; j++) c[j] += out[j];
        else for (int j = 0; j < nv; j++) c[j] = out[j];
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
        FBW_T *c = C + r * ldc;
        if (acc) for (int j = 0; j < nv; j++) c[j] += a[r][j];
        else for (int j = 0; j < nv; j++) c[j] = a[r][j];
    }
#endif
}

/* C (B, w) = [C +] X (B, K) . W[:, j0:j0+w], W packed by fbw_pack_* into P (panels of NR). Each
 * panel (K*NR elements) is read from cache once per group of up to FBW_MRMAX batch rows. */
FBW_ATTR static void
FBW_FN(fbw_product_)(Py_ssize_t B, Py_ssize_t K, const FBW_T *X, Py_ssize_t ldx, const FBW_T *P,
                     Py_ssize_t w, int acc, FBW_T *C, Py_ssize_t ldc)
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
            switch (mr) {
#define FBW_CASE(m) case m: FBW_FN(fbw_block_)(m, K, x, ldx, Pq, acc, c, ldc, nv); break;
            FBW_CASE(1) FBW_CASE(2) FBW_CASE(3) FBW_CASE(4)
#if FBW_MRMAX > 4
            FBW_CASE(5) FBW_CASE(6)
#endif
#if FBW_MRMAX > 6
            FBW_CASE(7) FBW_CASE(8) FBW_CASE(9) FBW_CASE(10) FBW_CASE(11) FBW_CASE(12)
#endif
#undef FBW_CASE
            default: break;
            }
            b += mr;
        }
    }
}

#undef FBW_V
#undef FBW_NR
#undef FBW_FN
#undef FBW_CAT
#undef FBW_CAT_
