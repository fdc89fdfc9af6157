/* spamopt's CPU loops over a whole group of tensors in one call (spamopt/optim/native.py builds this file
 * with the system's C compiler on first use and calls it through ctypes).
 *
 * spam_update_*: SPAM's dense per-coordinate update, the same operations in the same order and precision as
 * the torch.compile kernel (spamopt/optim/compiled.py, _update), so the results are bit for bit the same;
 * built without floating-point contraction (no fused multiply-add) and with IEEE square roots and divisions.
 * finite_peaks_*: each tensor's max|g| (NaN for a tensor holding NaN or +-Inf) and whether all are finite.
 * stable_spam_update_*: Stable-SPAM's per-tensor step (spamopt/optim/compiled.py, _stable_update, states
 * the math) for a whole group: the torch.compile kernel's operations, except that AdaGN's sum of squares is
 * accumulated in float64 (the kernel's float32 sum runs in an order of its own), so results agree to
 * rounding where AdaGN is on and bit for bit where it is off.
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

/* sign(x) as torch.sign: -1, 0 or 1. */
#define SIGN(T, x) ((x) > (T)0 ? (T)1 : ((x) < (T)0 ? (T)-1 : (T)0))

/* AdaClip applied to one (scaled) gradient value: mode 0 off, 1 scale (x·bound/mu above bound), 2 clamp. */
#define ADACLIP(T, FABS, mode, x, bound, over) \
    ((mode) == 0 ? (x) : (FABS(x) > (bound) ? ((mode) == 1 ? (x) * (over) : SIGN(T, x) * (bound)) : (x)))

/* An exact power of two s with peak·s in [0.5, 1); 1 for a zero or non-finite peak (stabilize.norm_scale). */
#define DEFINE_STABLE(T, SUFFIX, SQRT, FABS, MAXVAL, FREXP, LDEXP)                                              \
    static T norm_scale_##SUFFIX(T peak) {                                                                     \
        int exponent = 0;                                                                                      \
        const T mantissa = FREXP(peak, &exponent);                                                             \
        return (mantissa != (T)0 && isfinite(peak)) ? LDEXP((T)1, -exponent) : (T)1;                           \
    }                                                                                                          \
                                                                                                               \
    /* AdaGN's sum of squares over [lo, hi): inlined once per AdaClip mode, so the loop has no branch. */      \
    static inline __attribute__((always_inline)) double stable_squares_##SUFFIX(                               \
        const T *restrict g, int64_t lo, int64_t hi, int use, T factor, T b, T o, T s, const int mode) {       \
        double sum = 0;                                                                                        \
        _Pragma("omp simd reduction(+:sum)")                                                                   \
        for (int64_t i = lo; i < hi; ++i) {                                                                    \
            T x = ((g[i] < (T)INFINITY) & (g[i] > -(T)INFINITY) & use) ? g[i] : (T)0;                            \
            x = x * factor;                                                                                    \
            const T y = ADACLIP(T, FABS, mode, x, b, o) * s;                                                   \
            sum += (double)y * (double)y;                                                                      \
        }                                                                                                      \
        return sum;                                                                                            \
    }                                                                                                          \
                                                                                                               \
    /* The update over [lo, hi): inlined once per AdaClip mode and AdaGN choice. */                            \
    static inline __attribute__((always_inline)) void stable_apply_##SUFFIX(                                   \
        T *restrict p, const T *restrict g, T *restrict m, T *restrict v, int64_t lo, int64_t hi, int use,     \
        T factor, T b, T o, T q, T m_keep, T omb1, T v_keep, T omb2, T step, T sqrt_bias2, T eps, T decay,     \
        const int mode, const int adagn) {                                                                     \
        _Pragma("omp simd")                                                                                    \
        for (int64_t i = lo; i < hi; ++i) {                                                                    \
            T x = ((FABS(g[i]) < (T)INFINITY) & use) ? g[i] : (T)0;                                             \
            x = ADACLIP(T, FABS, mode, x * factor, b, o);                                                      \
            if (adagn) x = x * q;                                                                              \
            const T mi = m[i] * m_keep + omb1 * x;                                                             \
            const T vn = v[i] * v_keep + (omb2 * x) * x;                                                       \
            p[i] = p[i] * decay + (mi * step) / (SQRT(vn) / sqrt_bias2 + eps);                                 \
            m[i] = mi;                                                                                         \
            v[i] = vn;                                                                                         \
        }                                                                                                      \
    }                                                                                                          \
                                                                                                               \
    /* scalars (float64): keep, factor, decay, gamma1, gamma2, gamma3, beta1, beta2, eps, lr; corrections:     \
     * six float64 per tensor (1 - gamma1^n, 1 - gamma2^n, 1 - gamma3^n, 1 - beta1^k, sqrt(1 - beta2^k),       \
     * max|g| when peak_given); stats: three float64 per tensor (M, a, b), read and written. Returns -1,      \
     * having changed nothing, when its per-tensor scratch cannot be allocated. */                             \
    int stable_spam_update_##SUFFIX(int64_t count, T *const *params, const T *const *grads,                   \
                                     T *const *exp_avgs, T *const *exp_avg_sqs, double *const *max_emas,       \
                                     double *const *norm_emas, double *const *norm_sq_emas,                    \
                                     const int64_t *numels, const double *scalars, const double *corrections,  \
                                     int adaclip, int adagn, int peak_given, int threads,                      \
                                     int64_t parallel_min) {                                                   \
        const double keep = scalars[0], factor = scalars[1], decay = scalars[2], gamma1 = scalars[3];          \
        const double gamma2 = scalars[4], gamma3 = scalars[5], beta1 = scalars[6], beta2 = scalars[7];         \
        const double eps = scalars[8], lr = scalars[9];                                                        \
        const int use = keep > 0;                                                                              \
        const T factor_t = (T)factor, decay_t = (T)decay, eps_t = (T)eps;                                      \
        const T m_keep = (T)(1.0 - (1.0 - beta1) * keep), omb1 = (T)(1.0 - beta1);                             \
        const T v_keep = (T)(1.0 - (1.0 - beta2) * keep), omb2 = (T)(1.0 - beta2);                             \
        const int nth = threads > 0 ? threads : 1;                                                             \
        /* per tensor: mu, bound, bound / mu, the norm's scale, the AdaGN ratio; per thread and tensor:        \
         * partial maxima and sums of squares */                                                               \
        T *per = (T *)calloc((size_t)(5 * count), sizeof(T));                                                  \
        T *part_max = (T *)calloc((size_t)(nth * count), sizeof(T));                                           \
        double *part_sq = (double *)calloc((size_t)(nth * count), sizeof(double));                             \
        if (!per || !part_max || !part_sq) {                                                                   \
            free(per); free(part_max); free(part_sq);                                                          \
            return -1;                                                                                         \
        }                                                                                                      \
        T *mu = per, *bound = per + count, *over = per + 2 * count, *scale = per + 3 * count;                  \
        T *ratio = per + 4 * count;                                                                            \
        _Pragma("omp parallel num_threads(nth)") {                                                             \
            const int tid = omp_get_thread_num(), used = omp_get_num_threads();                                \
            int64_t small_seen = 0, lo, hi;                                                                    \
            if (!peak_given) {                                                                                 \
                for (int64_t t = 0; t < count; ++t) {                                                          \
                    thread_share(numels[t], parallel_min, &small_seen, tid, used, &lo, &hi);                   \
                    const T *restrict g = grads[t];                                                            \
                    T best = 0;                                                                                \
                    _Pragma("omp simd reduction(max:best)")                                                    \
                    for (int64_t i = lo; i < hi; ++i) {                                                        \
                        const T x = ((g[i] >= -MAXVAL) & (g[i] <= MAXVAL)) ? g[i] : (T)0;                         \
                        const T a = FABS(x);                                                                   \
                        best = a > best ? a : best;                                                            \
                    }                                                                                          \
                    part_max[tid * count + t] = best;                                                          \
                }                                                                                              \
                _Pragma("omp barrier")                                                                         \
            }                                                                                                  \
            _Pragma("omp single") {                                                                            \
                for (int64_t t = 0; t < count; ++t) {                                                          \
                    const double *row = corrections + 6 * t;                                                   \
                    T largest = 0;                                                                             \
                    if (peak_given) {                                                                          \
                        largest = (T)(use ? row[5] : 0.0);                                                     \
                    } else {                                                                                   \
                        for (int k = 0; k < nth; ++k)                                                          \
                            largest = part_max[k * count + t] > largest ? part_max[k * count + t] : largest;   \
                    }                                                                                          \
                    mu[t] = largest * (T)(fabs(factor) * keep);                                                \
                    bound[t] = mu[t];                                                                          \
                    if (adaclip) {                                                                             \
                        const double m_max = *max_emas[t] * (1.0 - (1.0 - gamma3) * keep)                      \
                                             + (1.0 - gamma3) * keep * (double)mu[t];                          \
                        bound[t] = (T)(m_max / row[2]);                                                        \
                        *max_emas[t] = m_max;                                                                  \
                    }                                                                                          \
                    over[t] = bound[t] / mu[t];                                                                \
                    scale[t] = norm_scale_##SUFFIX(mu[t]);                                                     \
                    ratio[t] = (T)1;                                                                           \
                }                                                                                              \
            }                                                                                                  \
            if (adagn) {                                                                                       \
                small_seen = 0;                                                                                \
                for (int64_t t = 0; t < count; ++t) {                                                          \
                    thread_share(numels[t], parallel_min, &small_seen, tid, used, &lo, &hi);                   \
                    const T *restrict g = grads[t];                                                            \
                    const T b = bound[t], o = over[t], s = scale[t];                                           \
                    part_sq[tid * count + t] =                                                                 \
                        adaclip == 0 ? stable_squares_##SUFFIX(g, lo, hi, use, factor_t, b, o, s, 0)           \
                        : adaclip == 1 ? stable_squares_##SUFFIX(g, lo, hi, use, factor_t, b, o, s, 1)         \
                                       : stable_squares_##SUFFIX(g, lo, hi, use, factor_t, b, o, s, 2);        \
                }                                                                                              \
                _Pragma("omp barrier")                                                                         \
                _Pragma("omp single") {                                                                        \
                    for (int64_t t = 0; t < count; ++t) {                                                      \
                        const double *row = corrections + 6 * t;                                               \
                        double sum = 0;                                                                        \
                        for (int k = 0; k < nth; ++k) sum += part_sq[k * count + t];                           \
                        const double r = sqrt(sum) / (double)scale[t];                                         \
                        const double a = *norm_emas[t] * (1.0 - (1.0 - gamma1) * keep)                         \
                                         + (1.0 - gamma1) * keep * r;                                          \
                        const double b = *norm_sq_emas[t] * (1.0 - (1.0 - gamma2) * keep)                      \
                                         + (1.0 - gamma2) * keep * (r * r);                                    \
                        const double target = a / row[0] / (sqrt(b / row[1]) + eps);                           \
                        ratio[t] = (T)(r > 0 ? target / r : 1.0);                                              \
                        *norm_emas[t] = a;                                                                     \
                        *norm_sq_emas[t] = b;                                                                  \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
            small_seen = 0;                                                                                    \
            for (int64_t t = 0; t < count; ++t) {                                                              \
                thread_share(numels[t], parallel_min, &small_seen, tid, used, &lo, &hi);                       \
                if (lo >= hi) continue;                                                                        \
                const double *row = corrections + 6 * t;                                                       \
                T *restrict p = params[t], *restrict m = exp_avgs[t], *restrict v = exp_avg_sqs[t];            \
                const T *restrict g = grads[t];                                                                \
                const T b = bound[t], o = over[t], q = ratio[t];                                               \
                const T step = (T)(-lr * keep / row[3]), sqrt_bias2 = (T)row[4];                               \
                /* one loop specialised for each AdaClip mode and AdaGN choice */                              \
                switch (2 * adaclip + (adagn != 0)) {                                                          \
                    case 0: APPLY_##SUFFIX(0, 0); break;                                                       \
                    case 1: APPLY_##SUFFIX(0, 1); break;                                                       \
                    case 2: APPLY_##SUFFIX(1, 0); break;                                                       \
                    case 3: APPLY_##SUFFIX(1, 1); break;                                                       \
                    case 4: APPLY_##SUFFIX(2, 0); break;                                                       \
                    default: APPLY_##SUFFIX(2, 1); break;                                                      \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        free(per); free(part_max); free(part_sq);                                                              \
        return 0;                                                                                              \
    }

#define APPLY_CALL(SUFFIX, mode, adagn)                                                                        \
    stable_apply_##SUFFIX(p, g, m, v, lo, hi, use, factor_t, b, o, q, m_keep, omb1, v_keep, omb2, step,        \
                          sqrt_bias2, eps_t, decay_t, mode, adagn)
#define APPLY_f32(mode, adagn) APPLY_CALL(f32, mode, adagn)
#define APPLY_f64(mode, adagn) APPLY_CALL(f64, mode, adagn)

DEFINE_STABLE(float, f32, sqrtf, fabsf, FLT_MAX, frexpf, ldexpf)
DEFINE_STABLE(double, f64, sqrt, fabs, DBL_MAX, frexp, ldexp)
