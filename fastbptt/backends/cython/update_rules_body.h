/* The optimizers' element-wise rules for one element type (included by
 * update_rules.h with FBU_T, FBU_IT -- the signed integer of FBU_T's width -- and FBU_SFX defined).
 *
 * Each loop does the operations of the NumPy code of its optimizer's _update (fastbptt/optim.py), in
 * the same order and in FBU_T, so that it is bit-identical to it (built with -ffp-contract=off: no
 * FMA). The flags are constants of an always-inlined body, so each combination is its own loop,
 * branch-free and vectorised. A rule runs over the parameters' runs (fbu_parts), the other arrays
 * taken at the same offsets. Each first checks the gradient and, with has_clip, clamps it into
 * [-clip, clip] as fbu_clamp does (np.minimum then np.maximum; g itself is not written), and returns
 * FBU_OUT_BAD when an output element is not finite (x - x is 0 only for a finite x) and
 * FBU_GRAD_BAD when a gradient element is not (then the outputs are meaningless).
 */

#define FBU_CAT2(a, b) a##b
#define FBU_CAT(a, b) FBU_CAT2(a, b)
#define FBU_FN(name) FBU_CAT(name, FBU_SFX)
#define FBU_BAD(x) ((FBU_IT)((x) - (x) != (FBU_T)0))
#define FBU_INLINE static inline __attribute__((always_inline))
/* the gradient element gi checked (into gbad), then clamped with has_clip */
#define FBU_GRAD(gi, gbad)                                                                            \
    do {                                                                                              \
        gbad |= FBU_BAD(gi);                                                                          \
        if (has_clip) {                                                                               \
            gi = gi < clip ? gi : clip;                                                               \
            gi = gi > -clip ? gi : -clip;                                                             \
        }                                                                                             \
    } while (0)
#define FBU_RESULT(bad, gbad) (((bad) != 0) * FBU_OUT_BAD | ((gbad) != 0) * FBU_GRAD_BAD)

static int FBU_FN(fbu_nonfinite)(const FBU_T *restrict x, ptrdiff_t n) {
    FBU_IT bad = 0;
    for (ptrdiff_t i = 0; i < n; i++) bad |= FBU_BAD(x[i]);
    return bad != 0;
}

static void FBU_FN(fbu_clamp)(FBU_T *restrict x, ptrdiff_t n, FBU_T c) {
    /* np.minimum(x, c) then np.maximum(x, -c), for finite x */
    for (ptrdiff_t i = 0; i < n; i++) {
        FBU_T v = x[i] < c ? x[i] : c;
        x[i] = v > -c ? v : -c;
    }
}

FBU_INLINE int FBU_FN(fbu_sgd_body)(const FBU_T *restrict p, const FBU_T *restrict g, const FBU_T *restrict buf,
                                     FBU_T *restrict new_buf, FBU_T *restrict new_p, ptrdiff_t n, FBU_T lr,
                                     FBU_T mom, FBU_T wd, const int has_wd, const int has_mom,
                                     const int nesterov, const int first, const int has_clip, FBU_T clip) {
    FBU_IT bad = 0, gbad = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        FBU_T gi = g[i], b, np_;
        FBU_GRAD(gi, gbad);
        if (has_wd) gi = gi + p[i] * wd;
        if (has_mom) {
            b = first ? gi : buf[i] * mom + gi;
            new_buf[i] = b;
            bad |= FBU_BAD(b);
            gi = nesterov ? gi + b * mom : b;
        }
        np_ = p[i] - gi * lr;
        new_p[i] = np_;
        bad |= FBU_BAD(np_);
    }
    return FBU_RESULT(bad, gbad);
}

static int FBU_FN(fbu_sgd_run)(const FBU_T *p, const FBU_T *g, const FBU_T *buf, FBU_T *new_buf, FBU_T *new_p,
                           ptrdiff_t n, FBU_T lr, FBU_T mom, FBU_T wd, int has_wd, int has_mom, int nesterov,
                           int first, FBU_T clip) {
#define FBU_SGD(w, m, s, f)                                                                           \
    (clip > 0 ? FBU_FN(fbu_sgd_body)(p, g, buf, new_buf, new_p, n, lr, mom, wd, w, m, s, f, 1, clip)      \
              : FBU_FN(fbu_sgd_body)(p, g, buf, new_buf, new_p, n, lr, mom, wd, w, m, s, f, 0, clip))
    if (!has_mom) return has_wd ? FBU_SGD(1, 0, 0, 0) : FBU_SGD(0, 0, 0, 0);
    if (has_wd) {
        if (nesterov) return first ? FBU_SGD(1, 1, 1, 1) : FBU_SGD(1, 1, 1, 0);
        return first ? FBU_SGD(1, 1, 0, 1) : FBU_SGD(1, 1, 0, 0);
    }
    if (nesterov) return first ? FBU_SGD(0, 1, 1, 1) : FBU_SGD(0, 1, 1, 0);
    return first ? FBU_SGD(0, 1, 0, 1) : FBU_SGD(0, 1, 0, 0);
#undef FBU_SGD
}

FBU_INLINE int FBU_FN(fbu_adam_body)(const FBU_T *restrict p, const FBU_T *restrict g, const FBU_T *restrict m,
                                      const FBU_T *restrict v, FBU_T *restrict new_m, FBU_T *restrict new_v,
                                      FBU_T *restrict new_p, ptrdiff_t n, FBU_T w, FBU_T b2, FBU_T b2c,
                                      FBU_T step, FBU_T corr, FBU_T eps, FBU_T wd, const int has_wd,
                                      const int low, const int has_clip, FBU_T clip) {
    FBU_IT bad = 0, gbad = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        FBU_T gi = g[i], mi = m[i], vi = v[i], d, nm, nv, np_;
        FBU_GRAD(gi, gbad);
        if (has_wd) gi = gi + p[i] * wd;
        d = gi - mi;
        nm = low ? d * w + mi : gi - d * w;         /* torch's lerp: m + w·(g-m), or g - (g-m)·(1-w) */
        nv = vi * b2 + (gi * gi) * b2c;
        new_m[i] = nm;
        new_v[i] = nv;
        np_ = p[i] - (nm * step) / (FBU_SQRT(nv) / corr + eps);
        new_p[i] = np_;
        bad |= FBU_BAD(nm) | FBU_BAD(nv) | FBU_BAD(np_);
    }
    return FBU_RESULT(bad, gbad);
}

static int FBU_FN(fbu_adam_run)(const FBU_T *p, const FBU_T *g, const FBU_T *m, const FBU_T *v, FBU_T *new_m,
                            FBU_T *new_v, FBU_T *new_p, ptrdiff_t n, FBU_T w, FBU_T b2, FBU_T b2c, FBU_T step,
                            FBU_T corr, FBU_T eps, FBU_T wd, int has_wd, int low, FBU_T clip) {
#define FBU_ADAM(d, l)                                                                                \
    (clip > 0 ? FBU_FN(fbu_adam_body)(p, g, m, v, new_m, new_v, new_p, n, w, b2, b2c, step, corr, eps,    \
                                      wd, d, l, 1, clip)                                                  \
              : FBU_FN(fbu_adam_body)(p, g, m, v, new_m, new_v, new_p, n, w, b2, b2c, step, corr, eps,    \
                                      wd, d, l, 0, clip))
    if (has_wd) return low ? FBU_ADAM(1, 1) : FBU_ADAM(1, 0);
    return low ? FBU_ADAM(0, 1) : FBU_ADAM(0, 0);
#undef FBU_ADAM
}

FBU_INLINE int FBU_FN(fbu_rmsprop_body)(const FBU_T *restrict p, const FBU_T *restrict g,
                                         const FBU_T *restrict v, const FBU_T *restrict buf,
                                         FBU_T *restrict new_v, FBU_T *restrict new_buf, FBU_T *restrict new_p,
                                         ptrdiff_t n, FBU_T lr, FBU_T a, FBU_T ac, FBU_T eps, FBU_T mom,
                                         const int has_mom, const int has_clip, FBU_T clip) {
    FBU_IT bad = 0, gbad = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        FBU_T gi = g[i], nv, avg, np_;
        FBU_GRAD(gi, gbad);
        nv = v[i] * a + (gi * gi) * ac;
        new_v[i] = nv;
        avg = FBU_SQRT(nv) + eps;
        if (has_mom) {
            FBU_T b = buf[i] * mom + gi / avg;
            new_buf[i] = b;
            bad |= FBU_BAD(b);
            np_ = p[i] - b * lr;
        } else {
            np_ = p[i] - (gi * lr) / avg;
        }
        new_p[i] = np_;
        bad |= FBU_BAD(nv) | FBU_BAD(np_);
    }
    return FBU_RESULT(bad, gbad);
}

static int FBU_FN(fbu_rmsprop_run)(const FBU_T *p, const FBU_T *g, const FBU_T *v, const FBU_T *buf, FBU_T *new_v,
                               FBU_T *new_buf, FBU_T *new_p, ptrdiff_t n, FBU_T lr, FBU_T a, FBU_T ac, FBU_T eps,
                               FBU_T mom, int has_mom, FBU_T clip) {
#define FBU_RMS(m, c) \
    FBU_FN(fbu_rmsprop_body)(p, g, v, buf, new_v, new_buf, new_p, n, lr, a, ac, eps, mom, m, c, clip)
    if (clip > 0) return has_mom ? FBU_RMS(1, 1) : FBU_RMS(0, 1);
    return has_mom ? FBU_RMS(1, 0) : FBU_RMS(0, 0);
#undef FBU_RMS
}

FBU_INLINE int FBU_FN(fbu_adagrad_body)(const FBU_T *restrict p, const FBU_T *restrict g,
                                         const FBU_T *restrict s, FBU_T *restrict new_s, FBU_T *restrict new_p,
                                         ptrdiff_t n, FBU_T lr, FBU_T eps, const int has_clip, FBU_T clip) {
    FBU_IT bad = 0, gbad = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        FBU_T gi = g[i], ns, np_;
        FBU_GRAD(gi, gbad);
        ns = s[i] + gi * gi;
        new_s[i] = ns;
        np_ = p[i] - (gi * lr) / (FBU_SQRT(ns) + eps);
        new_p[i] = np_;
        bad |= FBU_BAD(ns) | FBU_BAD(np_);
    }
    return FBU_RESULT(bad, gbad);
}

static int FBU_FN(fbu_adagrad_run)(const FBU_T *p, const FBU_T *g, const FBU_T *s, FBU_T *new_s, FBU_T *new_p,
                               ptrdiff_t n, FBU_T lr, FBU_T eps, FBU_T clip) {
    return clip > 0 ? FBU_FN(fbu_adagrad_body)(p, g, s, new_s, new_p, n, lr, eps, 1, clip)
                    : FBU_FN(fbu_adagrad_body)(p, g, s, new_s, new_p, n, lr, eps, 0, clip);
}

/* The rules over the parameters' runs: each run with the other arrays at its offset. */
#define FBU_OVER_PARTS(RUN, ...)                                                                      \
    int bad = 0;                                                                                      \
    ptrdiff_t o = 0;                                                                                  \
    for (ptrdiff_t r = 0; r < parts->k; r++) {                                                        \
        const FBU_T *p = (const FBU_T *)parts->data[r];                                               \
        ptrdiff_t n = parts->size[r];                                                                 \
        bad |= FBU_FN(RUN)(__VA_ARGS__);                                                              \
        o += n;                                                                                       \
    }                                                                                                 \
    return bad

static int FBU_FN(fbu_sgd)(const fbu_parts *parts, const FBU_T *g, const FBU_T *buf, FBU_T *new_buf,
                           FBU_T *new_p, FBU_T lr, FBU_T mom, FBU_T wd, int has_wd, int has_mom, int nesterov,
                           int first, FBU_T clip) {
    FBU_OVER_PARTS(fbu_sgd_run, p, g + o, FBU_AT(buf, o), FBU_AT(new_buf, o), new_p + o, n, lr, mom, wd,
                   has_wd, has_mom, nesterov, first, clip);
}

static int FBU_FN(fbu_adam)(const fbu_parts *parts, const FBU_T *g, const FBU_T *m, const FBU_T *v,
                            FBU_T *new_m, FBU_T *new_v, FBU_T *new_p, FBU_T w, FBU_T b2, FBU_T b2c, FBU_T step,
                            FBU_T corr, FBU_T eps, FBU_T wd, int has_wd, int low, FBU_T clip) {
    FBU_OVER_PARTS(fbu_adam_run, p, g + o, m + o, v + o, new_m + o, new_v + o, new_p + o, n, w, b2, b2c, step,
                   corr, eps, wd, has_wd, low, clip);
}

static int FBU_FN(fbu_rmsprop)(const fbu_parts *parts, const FBU_T *g, const FBU_T *v, const FBU_T *buf,
                               FBU_T *new_v, FBU_T *new_buf, FBU_T *new_p, FBU_T lr, FBU_T a, FBU_T ac,
                               FBU_T eps, FBU_T mom, int has_mom, FBU_T clip) {
    FBU_OVER_PARTS(fbu_rmsprop_run, p, g + o, v + o, FBU_AT(buf, o), new_v + o, FBU_AT(new_buf, o), new_p + o,
                   n, lr, a, ac, eps, mom, has_mom, clip);
}

static int FBU_FN(fbu_adagrad)(const fbu_parts *parts, const FBU_T *g, const FBU_T *s, FBU_T *new_s,
                               FBU_T *new_p, FBU_T lr, FBU_T eps, FBU_T clip) {
    FBU_OVER_PARTS(fbu_adagrad_run, p, g + o, s + o, new_s + o, new_p + o, n, lr, eps, clip);
}
#undef FBU_OVER_PARTS

#undef FBU_T
#undef FBU_IT
#undef FBU_SFX
#undef FBU_SQRT
