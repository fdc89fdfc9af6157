/* spamopt's CPU loops over a whole group of tensors in one call (spamopt/optim/native.py builds this file
 * with the system's C compiler on first use and calls it through ctypes).
 *
 * spam_update_*: SPAM's dense per-coordinate update, the same operations in the same order and precision as
 * the torch.compile kernel (spamopt/optim/compiled.py, _update), so the results are bit for bit the same;
 * built without floating-point contraction (no fused multiply-add) and with IEEE square roots and divisions.
 * finite_peaks_*: each tensor's max|g| (NaN for a tensor holding NaN or +-Inf) and whether all are finite.
 *
 * One OpenMP region per call: a tensor of at least parallel_min elements is split into one contiguous share
 * per thread, a smaller one goes whole to one thread (in turn), and no thread waits for another between
 * tensors, which are independent memory. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <float.h>
#include <omp.h>

/* The slice [*lo, *hi) of an n-element tensor that thread tid of nth updates. Every thread walks the
 * tensors in the same order, so its count of small tensors (*small_seen) is the same on every thread. */
static void thread_share(int64_t n, int64_t parallel_min, int64_t *small_seen, int tid, int nth, int64_t *lo,
                         int64_t *hi) {
    if (n >= parallel_min) {
        int64_t chunk = (n + nth - 1) / nth;
        chunk = (chunk + 63) & ~(int64_t)63; /* whole cache lines for each thread */
        *lo = tid * chunk < n ? tid * chunk : n;
        *hi = *lo + chunk < n ? *lo + chunk : n;
    } else {
        int owner = (int)((*small_seen)++ % nth);
        *lo = 0;
        *hi = owner == tid ? n : 0;
    }
}

#define DEFINE_LOOPS(T, SUFFIX, SQRT, FABS, MAXVAL)                                                            \
    /* One coordinate of SPAM's update; returns 1 when its gradient was clipped (|g| above the bound). */      \
    static inline int64_t spam_coordinate_##SUFFIX(T *restrict p, const T *restrict g, T *restrict m,            \
                                                   T *restrict v, int64_t i, int use, T factor, T theta,         \
                                                   T unseen, T m_keep, T v_keep, T omb1, T omb2, T step,         \
                                                   T eps, T decay) {                                             \
        T x = g[i];                                                                                            \
        x = (FABS(x) < (T)INFINITY && use) ? x : (T)0;                                                         \
        x = x * factor;                                                                                        \
        const T vi = v[i];                                                                                     \
        const T bound = vi == (T)0 ? unseen : SQRT(vi * theta);                                                \
        const T low = -bound;                                                                                  \
        T c = x > low ? x : low;                                                                               \
        c = c < bound ? c : bound;                                                                             \
        const T mi = m[i] * m_keep + omb1 * c;                                                                 \
        const T vn = vi * v_keep + (omb2 * c) * c;                                                             \
        p[i] = (p[i] + mi * (step / (SQRT(vn) + eps))) * decay;                                                \
        m[i] = mi;                                                                                             \
        v[i] = vn;                                                                                             \
        return FABS(x) > bound;                                                                                \
    }                                                                                                          \
                                                                                                               \
    /* scalars (float64): keep, theta, clip v = 0 coordinates (1) or not, the gradient's factor, the decay     \
     * factor, 1 - beta1, 1 - beta2, eps; step_sizes: one per tensor; counts (may be NULL): clipped            \
     * coordinates per tensor. */                                                                              \
    void spam_update_##SUFFIX(int64_t count, T *const *params, const T *const *grads, T *const *exp_avgs,      \
                              T *const *exp_avg_sqs, const int64_t *numels, const double *step_sizes,          \
                              const double *scalars, int64_t *counts, int threads, int64_t parallel_min) {     \
        const double keep = scalars[0], threshold = scalars[1], clip_unseen = scalars[2];                      \
        const T theta = threshold > 0 ? (T)threshold : (T)INFINITY;                                            \
        const T unseen = (clip_unseen > 0 && threshold > 0) ? (T)0 : (T)INFINITY;                              \
        const T keep_t = (T)keep, factor = (T)scalars[3], decay = (T)scalars[4];                               \
        const T omb1 = (T)scalars[5], omb2 = (T)scalars[6], eps = (T)scalars[7];                               \
        const T m_keep = (T)1 - omb1 * keep_t, v_keep = (T)1 - omb2 * keep_t;                                  \
        const int use = keep > 0;                                                                              \
        if (counts)                                                                                            \
            for (int64_t t = 0; t < count; ++t) counts[t] = 0;                                                 \
        _Pragma("omp parallel num_threads(threads)") {                                                         \
            const int tid = omp_get_thread_num(), nth = omp_get_num_threads();                                 \
            int64_t small_seen = 0;                                                                            \
            for (int64_t t = 0; t < count; ++t) {                                                              \
                int64_t lo, hi;                                                                                \
                thread_share(numels[t], parallel_min, &small_seen, tid, nth, &lo, &hi);                        \
                if (lo >= hi) continue;                                                                        \
                T *restrict p = params[t], *restrict m = exp_avgs[t], *restrict v = exp_avg_sqs[t];            \
                const T *restrict g = grads[t];                                                                \
                const T step = (T)step_sizes[t];                                                               \
                if (counts) {                                                                                  \
                    int64_t clipped = 0;                                                                       \
                    _Pragma("omp simd reduction(+:clipped)")                                                   \
                    for (int64_t i = lo; i < hi; ++i)                                                          \
                        clipped += spam_coordinate_##SUFFIX(p, g, m, v, i, use, factor, theta, unseen, m_keep, \
                                                            v_keep, omb1, omb2, step, eps, decay);             \
                    _Pragma("omp atomic")                                                                      \
                    counts[t] += clipped;                                                                      \
                } else {                                                                                       \
                    _Pragma("omp simd")                                                                        \
                    for (int64_t i = lo; i < hi; ++i)                                                          \
                        spam_coordinate_##SUFFIX(p, g, m, v, i, use, factor, theta, unseen, m_keep, v_keep,    \
                                                 omb1, omb2, step, eps, decay);                                \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
                                                                                                               \
    /* peaks[t] = max|g| of tensor t, NaN when it holds NaN or +-Inf; returns 1 when every value is finite.    \
     * Empty tensors are not passed. */                                                                        \
    int finite_peaks_##SUFFIX(int64_t count, const T *const *grads, const int64_t *numels, T *peaks,           \
                              int threads, int64_t parallel_min) {                                             \
        int nth = threads > 0 ? threads : 1;                                                                   \
        T *partial = (T *)calloc((size_t)(nth * count), sizeof(T));                                            \
        if (!partial) return -1;                                                                               \
        _Pragma("omp parallel num_threads(nth)") {                                                             \
            const int tid = omp_get_thread_num(), used = omp_get_num_threads();                                \
            int64_t small_seen = 0;                                                                            \
            for (int64_t t = 0; t < count; ++t) {                                                              \
                int64_t lo, hi;                                                                                \
                thread_share(numels[t], parallel_min, &small_seen, tid, used, &lo, &hi);                       \
                if (lo >= hi) continue;                                                                        \
                const T *restrict g = grads[t];                                                                \
                T best = 0;                                                                                    \
                int nonfinite = 0;                                                                             \
                _Pragma("omp simd reduction(max:best) reduction(|:nonfinite)")                                 \
                for (int64_t i = lo; i < hi; ++i) {                                                            \
                    const T a = FABS(g[i]);                                                                    \
                    best = a > best ? a : best;                                                                \
                    nonfinite |= !(a <= MAXVAL);                                                               \
                }                                                                                              \
                partial[tid * count + t] = nonfinite ? (T)NAN : best;                                          \
            }                                                                                                  \
        }                                                                                                      \
        int finite = 1;                                                                                        \
        for (int64_t t = 0; t < count; ++t) {                                                                  \
            T peak = 0;                                                                                        \
            for (int k = 0; k < nth; ++k) {                                                                    \
                const T x = partial[k * count + t];                                                            \
                peak = (isnan(x) || isnan(peak)) ? (T)NAN : (x > peak ? x : peak);                             \
            }                                                                                                  \
            peaks[t] = peak;                                                                                   \
            finite &= !isnan(peak);                                                                            \
        }                                                                                                      \
        free(partial);                                                                                         \
        return finite;                                                                                         \
    }

DEFINE_LOOPS(float, f32, sqrtf, fabsf, FLT_MAX)
DEFINE_LOOPS(double, f64, sqrt, fabs, DBL_MAX)
