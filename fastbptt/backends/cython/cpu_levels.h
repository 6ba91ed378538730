/* The instruction-set levels of the compiled loops (simd_step.h, update_rules.h): 0 the build's
 * baseline, 1 AVX2, 2 AVX-512F (x86-64 with GCC; elsewhere only the baseline). With `fma`, levels 1
 * and 2 also need FMA. */
#ifndef FASTBPTT_CPU_LEVELS_H
#define FASTBPTT_CPU_LEVELS_H

static inline int fb_cpu_has_level(int level, int fma) {
    if (level == 0) return 1;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    if (fma && !__builtin_cpu_supports("fma")) return 0;
    if (level == 1) return __builtin_cpu_supports("avx2");
    if (level == 2) return __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

#endif
