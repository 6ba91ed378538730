/* The optimizers' element-wise rules (update.pyx), one source (update_rules_body.h) for each
 * element type. Built for the baseline instruction set: the float32 loops are bound by sqrt, division
 * and memory, and AVX2 or AVX-512 builds of them measured no faster (the float64 ones do not vectorise
 * at SSE2: docs/fused.md). No FMA
 * (update.pyx is built with -ffp-contract=off): the rules are bit-identical to the NumPy code.
 */
#ifndef FASTBPTT_UPDATE_RULES_H
#define FASTBPTT_UPDATE_RULES_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* The parameters a rule reads: runs of memory one after the other (the arrays of the model, read
 * where they are), FBU_MAX_PARTS at most; the other arrays of a rule are single flat ones. */
#define FBU_MAX_PARTS 512
typedef struct {
    const char *data[FBU_MAX_PARTS];
    ptrdiff_t size[FBU_MAX_PARTS];
    ptrdiff_t k;
} fbu_parts;

/* x + o, for an array that may be absent (NULL) */
#define FBU_AT(x, o) ((x) ? (x) + (o) : NULL)

#define FBU_T float
#define FBU_IT int32_t
#define FBU_SFX _f32
#define FBU_SQRT sqrtf
#include "update_rules_body.h"
#define FBU_T double
#define FBU_IT int64_t
#define FBU_SFX _f64
#define FBU_SQRT sqrt
#include "update_rules_body.h"

#endif
