/* The optimizers' element-wise rules (update.pyx), one source (update_rules_body.h) for each
 * element type and instruction set. No FMA
 * (update.pyx is built with -ffp-contract=off): the rules are bit-identical to the NumPy code.
 */
#ifndef FASTBPTT_UPDATE_RULES_H
#define FASTBPTT_UPDATE_RULES_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cpu_levels.h"

/* The parameters a rule reads: runs of memory one after the other (the arrays of the model, read
 * where they are), FBU_MAX_PARTS at most; the other arrays of a rule are single flat ones. */
#define FBU_MAX_PARTS 512
typedef struct {
    const char *data[FBU_MAX_PARTS];
    ptrdiff_t size[FBU_MAX_PARTS];
    ptrdiff_t k;
} fbu_parts;

/* what a rule returns (or-ed): a value it wrote is not finite; a gradient value is not */
#define FBU_OUT_BAD 1
#define FBU_GRAD_BAD 2

/* x + o, for an array that may be absent (NULL) */
#define FBU_AT(x, o) ((x) ? (x) + (o) : NULL)

/* Each element type at three instruction sets, picked at run time (fbu_level, as simd_step.h's
 * levels): the baseline (SSE2 on x86-64), AVX2 and AVX-512F. The results are the same at every level
 * (the same operations in the same order, no FMA); GCC vectorises the float64 loops only from AVX2. */
#define FBU_T float
#define FBU_IT int32_t
#define FBU_SFX _f32_base
#define FBU_SQRT sqrtf
#include "update_rules_body.h"
#define FBU_T double
#define FBU_IT int64_t
#define FBU_SFX _f64_base
#define FBU_SQRT sqrt
#include "update_rules_body.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FBU_X86 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define FBU_T float
#define FBU_IT int32_t
#define FBU_SFX _f32_avx2
#define FBU_SQRT sqrtf
#include "update_rules_body.h"
#define FBU_T double
#define FBU_IT int64_t
#define FBU_SFX _f64_avx2
#define FBU_SQRT sqrt
#include "update_rules_body.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f")
#define FBU_T float
#define FBU_IT int32_t
#define FBU_SFX _f32_avx512
#define FBU_SQRT sqrtf
#include "update_rules_body.h"
#define FBU_T double
#define FBU_IT int64_t
#define FBU_SFX _f64_avx512
#define FBU_SQRT sqrt
#include "update_rules_body.h"
#pragma GCC pop_options
#else
#define FBU_X86 0
#endif

static int fbu_level = 0;

static int fbu_supported(int level) {
    return level >= 0 && level <= 2 && fb_cpu_has_level(level, 0);
}

/* AVX2 first: the loops are bound by sqrt and division, and AVX-512 measured 4-7 % slower than AVX2
 * (Adagrad over 23,165 values: float32 11.0 against 10.6 µs, float64 36.1 against 33.9 µs) */
static int fbu_best(void) { return fbu_supported(1) ? 1 : fbu_supported(2) ? 2 : 0; }

/* the level in force after asking for `level`: unchanged if the CPU lacks it */
static int fbu_set_level(int level) {
    if (level >= 0 && level <= 2 && fbu_supported(level)) fbu_level = level;
    return fbu_level;
}

#if FBU_X86
#define FBU_PICK(name) (fbu_level == 2 ? name##_avx512 : fbu_level == 1 ? name##_avx2 : name##_base)
#else
#define FBU_PICK(name) name##_base
#endif
#define fbu_nonfinite_f32 FBU_PICK(fbu_nonfinite_f32)
#define fbu_nonfinite_f64 FBU_PICK(fbu_nonfinite_f64)
#define fbu_clamp_f32 FBU_PICK(fbu_clamp_f32)
#define fbu_clamp_f64 FBU_PICK(fbu_clamp_f64)
#define fbu_sgd_f32 FBU_PICK(fbu_sgd_f32)
#define fbu_sgd_f64 FBU_PICK(fbu_sgd_f64)
#define fbu_adam_f32 FBU_PICK(fbu_adam_f32)
#define fbu_adam_f64 FBU_PICK(fbu_adam_f64)
#define fbu_rmsprop_f32 FBU_PICK(fbu_rmsprop_f32)
#define fbu_rmsprop_f64 FBU_PICK(fbu_rmsprop_f64)
#define fbu_adagrad_f32 FBU_PICK(fbu_adagrad_f32)
#define fbu_adagrad_f64 FBU_PICK(fbu_adagrad_f64)

#endif
