// MoL's pair gate, fused (the PyTorch reference: gate.py's ``pair_gate``): for every (query m, item r) pair, from its
// P = NQ * NX component logits l,
//
//     g  = W l + c + a_m + b_r                (linear pair gate; W holds the learned scale: W + s I)
//     g  = s l + c + a_m + b_r + V2 silu(V1 l + e1)   (MLP pair gate, NH hidden units: W = s I, c = its output bias;
//                                                      only W's diagonal is read)
//     pi = softmax(g)                         (gate)
//     s  = sum_p keep_p pi_p l_p              (score; keep_p = 0 or 1 / (1 - dropout), the gate dropout)
//
// plus, over the pairs with r < stat_items, the sums of pi (the components' usage) and of H(pi) (for the
// load-balancing loss), and the backward of all of it. Each pair's values stay in registers instead of a dozen
// passes over (M, R, P) tensors; the backward recomputes g and pi instead of storing them, and the dropout mask is a
// hash of (seed, pair, component), so nothing of size (M, R, P) is kept.
//
// Pairs are taken RB at a time in VW-float vectors (GCC / clang vector extensions): 16 where the compiler targets
// AVX-512 and P and NH allow, else 8 (two SSE or one AVX register). With bfloat16 logits and AVX512-BF16 the gate's
// matrix-vector products and weight gradients run in bfloat16 (BF16_DOTS below). Threads: OpenMP where the build has
// it (the pragmas are ignored otherwise and the loops run serially).
//
// Built by kernel.py with torch.utils.cpp_extension and -DNQ=.. -DNX=.. -DNH=.. (P and NH multiples of 8, NH = 0 for
// the linear gate) -DPAIR_GATE_LIBRARY=<namespace>; registered there as torch operators. Layouts (row-major, shape
// legend of gate.py: G groups of Q queries, C items each, M = G * Q query rows, R = C): logits (G, Q, NQ, C, NX), the
// component matmul's own output, read without a permute; a (G, Q, P); b (1 | G, C, P): items shared by every group,
// or each group's own; c (P); W (P, P); V1 (NH, P); e1 (NH); V2 (P, NH); scores (G, Q, C). Logits and their gradient
// are float or bfloat16, everything else float.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#ifndef NQ
#define NQ 8
#endif
#ifndef NX
#define NX 4
#endif
#ifndef NH
#define NH 0
#endif
#define NP (NQ * NX)
#if defined(__AVX512F__) && NP % 16 == 0 && NH % 16 == 0
#define VW 16                  // floats per vector: AVX-512's 16 where the target has it and P and H allow, else 8
#else
#define VW 8
#endif
#define NV (NP / VW)           // vectors per pair
#define HV (NH / VW)           // vectors of the hidden layer
#define RB 6                   // pairs processed together: independent FMA chains per weight load
static_assert(NP % 8 == 0, "P must be a multiple of 8");
static_assert(NH % 8 == 0, "the hidden width must be a multiple of 8");
#define HV1 (HV > 0 ? HV : 1)  // array extents (the MLP's arrays exist, unused, in the linear gate's build)
#define NH1 (NH > 0 ? NH : 1)

typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));
typedef uint32_t vu __attribute__((vector_size(4 * VW)));
typedef float v8 __attribute__((vector_size(32)));

// With bfloat16 logits (bf16-mixed) on a CPU with AVX512-BF16, the gate's matrix-vector products and the outer products
// of its weight gradients take bfloat16 operands and accumulate in float32 (two products per instruction, twice the
// float32 rate), as autocast's bfloat16 linear layers would; everything else stays in float32.
#if defined(__AVX512BF16__) && VW == 16
#include <immintrin.h>
#define BF16_DOTS 1
#else
#define BF16_DOTS 0
#endif

static inline vf bcast(float x) { return vf{} + x; }
static inline vf loadv(const float *p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline void storev(float *p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
#if VW == 16
static inline float hsum(vf v) {
    v8 low, high;
    std::memcpy(&low, &v, sizeof low);
    std::memcpy(&high, reinterpret_cast<const char *>(&v) + sizeof low, sizeof high);
    return hsum(low + high);
}
#endif

// e^x for x <= 0 as 2^n p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-6 Taylor polynomial
// (relative error below 2e-7); x below -87 counts as -87 (e^-87 ~ 1.6e-38, near the smallest normal float).
static inline vf exp_nonpositive(vf x) {
    x = x < bcast(-87.f) ? bcast(-87.f) : x;
    const vi n = __builtin_convertvector(x * bcast(1.44269504f) - bcast(0.5f), vi);  // rounds, as x <= 0
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = (x - nf * bcast(0.693359375f)) - nf * bcast(-2.12194440e-4f);  // ln 2 in two parts
    vf p = bcast(1.f / 720.f);
    p = p * r + bcast(1.f / 120.f);
    p = p * r + bcast(1.f / 24.f);
    p = p * r + bcast(1.f / 6.f);
    p = p * r + bcast(0.5f);
    p = p * r + bcast(1.f);
    p = p * r + bcast(1.f);
    const vi bits = (n + 127) << 23;
    vf two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}
static inline vu hash32(vu x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

// sigmoid(x) for any x, through e^-|x| <= 1.
static inline vf sigmoid(vf x) {
    const vf e = exp_nonpositive(x < bcast(0.f) ? x : -x);
    const vf one = bcast(1.f);
    return x < bcast(0.f) ? e / (one + e) : one / (one + e);
}

static inline float to_float(float x) { return x; }
static inline float to_float(uint16_t x) { uint32_t bits = uint32_t(x) << 16; float f; std::memcpy(&f, &bits, 4); return f; }
static inline void from_float(float x, float *out) { *out = x; }
static inline void from_float(float x, uint16_t *out) {  // round to nearest even (finite inputs)
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    *out = uint16_t((bits + 0x7fffU + ((bits >> 16) & 1U)) >> 16);
}

// y[q] += sum_k x[q][k] rows[k] for the nb pairs q: a matrix of IN rows of OUT vectors, row-major, times
// each pair's IN values; every row is loaded once for the nb pairs.
template <int IN, int OUT>
static inline __attribute__((always_inline)) void add_matvec(const int nb, const float *rows, const float (*x)[IN], vf (*y)[OUT]) {
    for (int k = 0; k < IN; ++k) {
        vf w[OUT];
        for (int v = 0; v < OUT; ++v) w[v] = loadv(rows + (k * OUT + v) * VW);
        for (int q = 0; q < nb; ++q) {
            const vf xk = bcast(x[q][k]);
            for (int v = 0; v < OUT; ++v) y[q][v] += w[v] * xk;
        }
    }
}

#if BF16_DOTS
// add_matvec with bfloat16 rows and inputs: pairs holds the rows two at a time, interleaved ((IN / 2, OUT * VW, 2), as
// interleave_pairs writes them), and each step takes two of a pair's inputs, side by side in memory, as one 32-bit word.
template <int IN, int OUT>
static inline __attribute__((always_inline)) void add_matvec_bf16(const int nb, const uint16_t *pairs, const uint16_t (*x)[IN], vf (*y)[OUT]) {
    for (int k = 0; k < IN / 2; ++k) {
        __m512bh w[OUT];
        for (int v = 0; v < OUT; ++v) w[v] = (__m512bh)_mm512_loadu_si512(pairs + (k * OUT + v) * 2 * VW);
        for (int q = 0; q < nb; ++q) {
            uint32_t two;
            std::memcpy(&two, x[q] + 2 * k, sizeof two);
            const __m512bh xk = (__m512bh)_mm512_set1_epi32(int32_t(two));
            for (int v = 0; v < OUT; ++v) y[q][v] = (vf)_mm512_dpbf16_ps((__m512)y[q][v], w[v], xk);
        }
    }
}

static inline void store_bf16(uint16_t *p, vf v) {  // round to nearest even
    const __m256bh rounded = _mm512_cvtneps_pbh((__m512)v);
    std::memcpy(p, &rounded, sizeof rounded);
}

// rows[k] += sum_q x[q][k] y[q] (add_outer below) from bfloat16 x and y rounded to bfloat16, two pairs per instruction:
// the y of pairs q and q + 1 interleaved lane by lane, times their two x[.][k] side by side, accumulated in float32.
template <int IN, int OUT>
static inline __attribute__((always_inline)) void add_outer_bf16(const int nb, float *rows, const uint16_t (*x)[IN], const vf (*y)[OUT]) {
    constexpr int RP = (RB + 1) / 2;
    const int np = (nb + 1) / 2;  // pairs of pairs; an odd last pair is paired with zeros
    alignas(64) static const uint16_t order_bits[2 * VW] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                             8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i order = _mm512_load_si512(order_bits);  // [y_q lane i, y_q+1 lane i] side by side
    __m512bh y2[RP][OUT];
    uint32_t x2[RP][IN];
    for (int t = 0; t < np; ++t) {
        const int q = 2 * t;
        const bool second = q + 1 < nb;
        for (int v = 0; v < OUT; ++v) {
            const __m512 upper = second ? (__m512)y[q + 1][v] : _mm512_setzero_ps();
            y2[t][v] = (__m512bh)_mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(upper, (__m512)y[q][v]));
        }
        for (int k = 0; k < IN; ++k) x2[t][k] = uint32_t(x[q][k]) | (second ? uint32_t(x[q + 1][k]) << 16 : 0U);
    }
    for (int k = 0; k < IN; ++k) {
        vf acc[OUT];
        for (int v = 0; v < OUT; ++v) acc[v] = loadv(rows + (k * OUT + v) * VW);
        for (int t = 0; t < np; ++t) {
            const __m512bh xk = (__m512bh)_mm512_set1_epi32(int32_t(x2[t][k]));
            for (int v = 0; v < OUT; ++v) acc[v] = (vf)_mm512_dpbf16_ps((__m512)acc[v], y2[t][v], xk);
        }
        for (int v = 0; v < OUT; ++v) storev(rows + (k * OUT + v) * VW, acc[v]);
    }
}

// A row-major (IN, OUT) float matrix as bfloat16 rows two at a time, interleaved: pairs[(k * OUT + o) * 2 + t] =
// rows[2k + t][o].
static void interleave_pairs(const float *rows, int in, int out, uint16_t *pairs) {
    if (rows == nullptr) return;
    for (int k = 0; k < in / 2; ++k)
        for (int o = 0; o < out; ++o)
            for (int t = 0; t < 2; ++t) from_float(rows[(2 * k + t) * out + o], pairs + (k * out + o) * 2 + t);
}
#endif

// rows[k] += sum_q x[q][k] y[q] for k < IN: the outer products of the nb pairs added into a row-major matrix in memory
// (a weight's gradient); every row is loaded and stored once for the nb pairs.
template <int IN, int OUT>
static inline __attribute__((always_inline)) void add_outer(const int nb, float *rows, const float (*x)[IN], const vf (*y)[OUT]) {
    for (int k = 0; k < IN; ++k) {
        vf acc[OUT];
        for (int v = 0; v < OUT; ++v) acc[v] = loadv(rows + (k * OUT + v) * VW);
        for (int q = 0; q < nb; ++q) {
            const vf xk = bcast(x[q][k]);
            for (int v = 0; v < OUT; ++v) acc[v] += xk * y[q][v];
        }
        for (int v = 0; v < OUT; ++v) storev(rows + (k * OUT + v) * VW, acc[v]);
    }
}

struct Gate {  // the inputs shared by every pair
    int64_t M, R, Q, stat_items;  // M = G * Q query rows, R = C items per group, Q queries per group
    int64_t b_group_stride;       // 0: b is (1, R, P), shared by every group; R * P: (G, R, P), each group's own
    const float *a, *b, *c, *W, *V1, *e1, *V2;  // V1, e1, V2: the MLP pair gate (NH > 0), else unused
    uint32_t seed, threshold;  // a component is dropped when its hash is below threshold (0: never)
    float keep_scale;          // 1 / (1 - dropout)
    float W_diagonal[NP];      // with the MLP gate W is diagonal (the learned scale)
    alignas(64) float Wt[NP * NP], V1t[NP * NH1], V2t[NH1 * NP];  // W^T, V1^T, V2^T
    // W^T, W, V1^T, V2^T, V2, V1 (as the float32 products use them) in bfloat16, rows interleaved in pairs: filled and
    // read only with BF16_DOTS
    alignas(64) uint16_t Wt_pairs[NP * NP], W_pairs[NP * NP], V1t_pairs[NP * NH1], V2t_pairs[NH1 * NP], V2_pairs[NP * NH1],
        V1_pairs[NH1 * NP];

    Gate(int64_t M, int64_t R, int64_t Q, int64_t stat_items, int64_t b_group_stride, const float *a, const float *b, const float *c,
         const float *W, const float *V1, const float *e1, const float *V2, uint32_t seed, uint32_t threshold, float keep_scale)
        : M(M), R(R), Q(Q), stat_items(stat_items), b_group_stride(b_group_stride), a(a), b(b), c(c), W(W), V1(V1), e1(e1), V2(V2),
          seed(seed), threshold(threshold), keep_scale(keep_scale) {
        for (int k = 0; k < NP; ++k) W_diagonal[k] = W[k * NP + k];
        transpose(W, NP, NP, Wt);
        if (NH > 0) {
            transpose(V1, NH, NP, V1t);
            transpose(V2, NP, NH, V2t);
        }
#if BF16_DOTS
        interleave_pairs(Wt, NP, NP, Wt_pairs);
        interleave_pairs(W, NP, NP, W_pairs);
        if (NH > 0) {
            interleave_pairs(V1t, NP, NH, V1t_pairs);
            interleave_pairs(V2t, NH, NP, V2t_pairs);
            interleave_pairs(V2, NP, NH, V2_pairs);
            interleave_pairs(V1, NH, NP, V1_pairs);
        }
#endif
    }

    static void transpose(const float *rows, int in, int out, float *transposed) {  // (in, out) -> (out, in)
        for (int i = 0; i < in; ++i)
            for (int o = 0; o < out; ++o) transposed[o * in + i] = rows[i * out + o];
    }
};

// Whether the gate's products run in bfloat16 (BF16_DOTS, above): with bfloat16 logits only.
template <typename T>
constexpr bool bf16_dots = BF16_DOTS && std::is_same<T, uint16_t>::value;

// y[q] += (a matrix) x[q] for the nb pairs: from its float rows and the float inputs, or with BF16 from its bfloat16
// row pairs and the bfloat16 inputs.
template <bool BF16, int IN, int OUT>
static inline __attribute__((always_inline)) void add_product(const int nb, const float *rows, const uint16_t *pairs, const float (*x)[IN],
                                                              const uint16_t (*x_bf16)[IN], vf (*y)[OUT]) {
#if BF16_DOTS
    if constexpr (BF16) {
        add_matvec_bf16<IN, OUT>(nb, pairs, x_bf16, y);
        return;
    }
#endif
    add_matvec<IN, OUT>(nb, rows, x, y);
}

// A weight's gradient: rows[k] += sum_q x[q][k] y[q], from the float inputs, or with BF16 from the bfloat16 inputs and y
// rounded to bfloat16 (autocast's bfloat16 linear layers take their weight gradients from bfloat16 operands too).
template <bool BF16, int IN, int OUT>
static inline __attribute__((always_inline)) void add_gradient(const int nb, float *rows, const float (*x)[IN], const uint16_t (*x_bf16)[IN],
                                                               const vf (*y)[OUT]) {
#if BF16_DOTS
    if constexpr (BF16) {
        add_outer_bf16<IN, OUT>(nb, rows, x_bf16, y);
        return;
    }
#endif
    add_outer<IN, OUT>(nb, rows, x, y);
}

// A product's input vector, stored as add_product<BF16> reads it.
template <bool BF16>
static inline void store_input(float *x, uint16_t *x_bf16, vf v) {
#if BF16_DOTS
    if constexpr (BF16) {
        store_bf16(x_bf16, v);
        return;
    }
#endif
    storev(x, v);
}

// Component logits of the nb (<= RB) pairs (m, r0 .. r0 + nb - 1) from the (M, NQ, R, NX) layout; with bf16_dots also
// their bfloat16 bits.
template <typename T>
static inline __attribute__((always_inline)) void load_logits(const int nb, const T *L, const Gate &s, int64_t m, int64_t r0, float l[RB][NP],
                                                              uint16_t l_bf16[RB][NP]) {
#if BF16_DOTS
    if constexpr (bf16_dots<T>) {  // the bits as they are, then widened 16 at a time
        for (int i = 0; i < NQ; ++i) {
            const T *row = L + ((m * NQ + i) * s.R + r0) * NX;
            for (int q = 0; q < nb; ++q) std::memcpy(l_bf16[q] + i * NX, row + q * NX, NX * sizeof(T));
        }
        for (int q = 0; q < nb; ++q)
            for (int v = 0; v < NV; ++v) {
                __m256i bits;
                std::memcpy(&bits, l_bf16[q] + VW * v, sizeof bits);
                storev(l[q] + VW * v, (vf)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
            }
        return;
    }
#endif
    for (int i = 0; i < NQ; ++i) {
        const T *row = L + ((m * NQ + i) * s.R + r0) * NX;
        for (int q = 0; q < nb; ++q)
            for (int j = 0; j < NX; ++j) l[q][i * NX + j] = to_float(row[q * NX + j]);
    }
}

// Gate logits g, gate pi, log-sum-exp and keep weights of the nb pairs.
// With the MLP gate also its hidden pre-activations hp and activations h.
template <bool BF16>
static inline __attribute__((always_inline)) void gate_block(const int nb, const Gate &s, int64_t m, int64_t r0, const float l[RB][NP],
                                                             const uint16_t l_bf16[RB][NP], vf g[RB][NV], vf pi[RB][NV],
                                                             vf keep[RB][NV], float lse[RB], vf hp[RB][HV1], vf h[RB][HV1]) {
    for (int q = 0; q < nb; ++q)
        for (int v = 0; v < NV; ++v) g[q][v] = loadv(s.c + VW * v) + loadv(s.a + m * NP + VW * v) + loadv(s.b + (m / s.Q) * s.b_group_stride + (r0 + q) * NP + VW * v);
    if (NH == 0) {
        add_product<BF16, NP, NV>(nb, s.Wt, s.Wt_pairs, l, l_bf16, g);  // g += W l
    } else {
        for (int q = 0; q < nb; ++q)
            for (int v = 0; v < NV; ++v) g[q][v] += loadv(s.W_diagonal + VW * v) * loadv(l[q] + VW * v);
        for (int q = 0; q < nb; ++q)
            for (int u = 0; u < HV; ++u) hp[q][u] = loadv(s.e1 + VW * u);
        add_product<BF16, NP, HV1>(nb, s.V1t, s.V1t_pairs, l, l_bf16, hp);  // hp = V1 l + e1
        float h_flat[RB][NH1];
        uint16_t h_bf16[RB][NH1];
        for (int q = 0; q < nb; ++q)
            for (int u = 0; u < HV; ++u) {
                h[q][u] = hp[q][u] * sigmoid(hp[q][u]);
                store_input<BF16>(h_flat[q] + VW * u, h_bf16[q] + VW * u, h[q][u]);
            }
        add_product<BF16, NH1, NV>(nb, s.V2t, s.V2t_pairs, h_flat, h_bf16, g);  // g += V2 h
    }
    vu lane;
    for (int i = 0; i < VW; ++i) lane[i] = uint32_t(i);
    for (int q = 0; q < nb; ++q) {
        vf vmax = g[q][0];
        for (int v = 1; v < NV; ++v) vmax = g[q][v] > vmax ? g[q][v] : vmax;
        float top = vmax[0];
        for (int i = 1; i < VW; ++i) top = vmax[i] > top ? vmax[i] : top;
        vf vsum = bcast(0.f);
        for (int v = 0; v < NV; ++v) { pi[q][v] = exp_nonpositive(g[q][v] - bcast(top)); vsum += pi[q][v]; }
        const float total = hsum(vsum);
        for (int v = 0; v < NV; ++v) pi[q][v] *= bcast(1.f / total);
        lse[q] = top + std::log(total);
        const uint64_t pair = uint64_t(m) * uint64_t(s.R) + uint64_t(r0 + q);
        const uint32_t base = hash32(s.seed ^ uint32_t(pair * 0x9e3779b9U) ^ hash32(uint32_t(pair >> 32)));
        for (int v = 0; v < NV; ++v) {
            const vu h = hash32((base + (lane + uint32_t(VW * v)) * 0x85ebca6bU));
            keep[q][v] = h >= s.threshold ? bcast(s.keep_scale) : bcast(0.f);
        }
    }
}

template <typename T>
static inline __attribute__((always_inline)) void forward_block(const int nb, const T *L, const Gate &s, int64_t m, int64_t r0,
                                                                float *scores, vf usage[NV], vf &entropy) {
    float l[RB][NP];
    uint16_t l_bf16[RB][NP];
    vf g[RB][NV], pi[RB][NV], keep[RB][NV], hp[RB][HV1], h[RB][HV1];
    float lse[RB];
    load_logits(nb, L, s, m, r0, l, l_bf16);
    gate_block<bf16_dots<T>>(nb, s, m, r0, l, l_bf16, g, pi, keep, lse, hp, h);
    for (int q = 0; q < nb; ++q) {
        vf score = bcast(0.f), pi_g = bcast(0.f);
        for (int v = 0; v < NV; ++v) score += pi[q][v] * keep[q][v] * loadv(l[q] + VW * v);
        scores[m * s.R + r0 + q] = hsum(score);
        if (r0 + q < s.stat_items) {
            for (int v = 0; v < NV; ++v) { pi_g += pi[q][v] * g[q][v]; usage[v] += pi[q][v]; }
            entropy += bcast(lse[q] / float(VW)) - pi_g;  // H(pi) = lse - sum_p pi_p g_p, summed over the lanes later
        }
    }
}

template <typename T>
static void forward(const T *L, const Gate &s, float *scores, double *usage_out, double *entropy_out, int num_threads) {
    double usage_all[NP] = {0};
    double entropy_all = 0.0;
#pragma omp parallel num_threads(num_threads)
    {
        double usage[NP] = {0};
        double entropy = 0.0;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < s.M; ++m) {
            vf row_usage[NV];
            vf row_entropy = bcast(0.f);
            for (int v = 0; v < NV; ++v) row_usage[v] = bcast(0.f);
            int64_t r = 0;
            for (; r + RB <= s.R; r += RB) forward_block(RB, L, s, m, r, scores, row_usage, row_entropy);
            for (; r < s.R; ++r) forward_block(1, L, s, m, r, scores, row_usage, row_entropy);
            for (int v = 0; v < NV; ++v)
                for (int i = 0; i < VW; ++i) usage[VW * v + i] += row_usage[v][i];
            entropy += hsum(row_entropy);
        }
#pragma omp critical
        {
            for (int p = 0; p < NP; ++p) usage_all[p] += usage[p];
            entropy_all += entropy;
        }
    }
    for (int p = 0; p < NP; ++p) usage_out[p] = usage_all[p];
    *entropy_out = entropy_all;
}

struct Upstream {  // gradients of the forward's outputs
    const float *scores;  // (M, R)
    const float *usage;   // (P,)
    float entropy;
};

template <typename T>
static inline __attribute__((always_inline)) void backward_block(const int nb, const T *L, const Gate &s, const Upstream &up, int64_t m,
                                                                 int64_t r0, T *dL, vf da[NV], float *db, float *dWt, float *dV1t,
                                                                 float *dV2t, vf de1[HV1]) {
    constexpr bool BF16 = bf16_dots<T>;
    float l[RB][NP];
    uint16_t l_bf16[RB][NP];
    vf g[RB][NV], pi[RB][NV], keep[RB][NV], dg[RB][NV], dl[RB][NV], hp[RB][HV1], h[RB][HV1];
    float lse[RB];
    load_logits(nb, L, s, m, r0, l, l_bf16);
    gate_block<BF16>(nb, s, m, r0, l, l_bf16, g, pi, keep, lse, hp, h);
    for (int q = 0; q < nb; ++q) {
        const vf dscore = bcast(up.scores[m * s.R + r0 + q]);
        const bool stats = r0 + q < s.stat_items;
        vf dpi[NV], pi_dpi = bcast(0.f);
        for (int v = 0; v < NV; ++v) {
            dpi[v] = dscore * keep[q][v] * loadv(l[q] + VW * v);
            if (stats)  // d usage_p / d pi_p = 1; d H / d pi_p = -(log pi_p + 1)
                dpi[v] += loadv(up.usage + VW * v) - bcast(up.entropy) * (g[q][v] - bcast(lse[q] - 1.f));
            pi_dpi += pi[q][v] * dpi[v];
        }
        const vf mean = bcast(hsum(pi_dpi));
        float *db_row = db + (r0 + q) * NP;
        for (int v = 0; v < NV; ++v) {
            dg[q][v] = pi[q][v] * (dpi[v] - mean);  // softmax backward
            da[v] += dg[q][v];
            storev(db_row + VW * v, loadv(db_row + VW * v) + dg[q][v]);
            dl[q][v] = dscore * keep[q][v] * pi[q][v];
        }
    }
    float dg_flat[RB][NP];
    uint16_t dg_bf16[RB][NP];
    for (int q = 0; q < nb; ++q)
        for (int v = 0; v < NV; ++v) store_input<BF16>(dg_flat[q] + VW * v, dg_bf16[q] + VW * v, dg[q][v]);
    if (NH == 0) {
        add_product<BF16, NP, NV>(nb, s.W, s.W_pairs, dg_flat, dg_bf16, dl);  // dl += W^T dg
        add_gradient<BF16, NP, NV>(nb, dWt, l, l_bf16, dg);  // dW^T[k, :] += l_k dg
    } else {  // W diagonal: dl += diag(W) dg, and only dW's diagonal, kept in dWt's first row until the end
        for (int q = 0; q < nb; ++q)
            for (int v = 0; v < NV; ++v) {
                dl[q][v] += loadv(s.W_diagonal + VW * v) * dg[q][v];
                storev(dWt + VW * v, loadv(dWt + VW * v) + loadv(l[q] + VW * v) * dg[q][v]);
            }
        vf dhp[RB][HV1];
        for (int q = 0; q < nb; ++q)
            for (int u = 0; u < HV; ++u) dhp[q][u] = bcast(0.f);
        add_product<BF16, NP, HV1>(nb, s.V2, s.V2_pairs, dg_flat, dg_bf16, dhp);  // dh = V2^T dg
        float dhp_flat[RB][NH1];
        uint16_t dhp_bf16[RB][NH1];
        for (int q = 0; q < nb; ++q)
            for (int u = 0; u < HV; ++u) {  // silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))
                const vf sg = sigmoid(hp[q][u]);
                dhp[q][u] *= sg * (bcast(1.f) + hp[q][u] * (bcast(1.f) - sg));
                de1[u] += dhp[q][u];
                store_input<BF16>(dhp_flat[q] + VW * u, dhp_bf16[q] + VW * u, dhp[q][u]);
            }
        add_product<BF16, NH1, NV>(nb, s.V1, s.V1_pairs, dhp_flat, dhp_bf16, dl);  // dl += V1^T dhp
        float h_flat[RB][NH1];
        uint16_t h_bf16[RB][NH1];
        for (int q = 0; q < nb; ++q)
            for (int u = 0; u < HV; ++u) store_input<BF16>(h_flat[q] + VW * u, h_bf16[q] + VW * u, h[q][u]);
        add_gradient<BF16, NH1, NV>(nb, dV2t, h_flat, h_bf16, dg);  // dV2^T[j, :] += h_j dg
        add_gradient<BF16, NP, HV1>(nb, dV1t, l, l_bf16, dhp);      // dV1^T[k, :] += l_k dhp
    }
#if BF16_DOTS
    if constexpr (BF16) {  // rounded 16 at a time, then written NX at a time
        uint16_t dl_bf16[RB][NP];
        for (int q = 0; q < nb; ++q)
            for (int v = 0; v < NV; ++v) store_bf16(dl_bf16[q] + VW * v, dl[q][v]);
        for (int i = 0; i < NQ; ++i) {
            T *row = dL + ((m * NQ + i) * s.R + r0) * NX;
            for (int q = 0; q < nb; ++q) std::memcpy(row + q * NX, dl_bf16[q] + i * NX, NX * sizeof(T));
        }
        return;
    }
#endif
    float dl_flat[RB][NP];
    std::memcpy(dl_flat, dl, sizeof dl_flat);
    for (int i = 0; i < NQ; ++i) {
        T *row = dL + ((m * NQ + i) * s.R + r0) * NX;
        for (int q = 0; q < nb; ++q)
            for (int j = 0; j < NX; ++j) from_float(dl_flat[q][i * NX + j], row + q * NX + j);
    }
}

// Writes dL and da; adds into db, dWt, dV1t, dV2t, de1 (zeroed by the caller). Items shared by every group: the rows
// are split between the threads, each adding its db into a buffer of its own; each group's own items: the groups are
// split, and a group's db rows are written by the one thread that has its queries.
template <typename T>
static void backward(const T *L, const Gate &s, const Upstream &up, T *dL, float *da, float *db, float *dWt, float *dV1t,
                     float *dV2t, float *de1, int num_threads) {
    const bool shared = s.b_group_stride == 0;
    const int64_t units = shared ? s.M : s.M / s.Q;  // rows, or groups of Q rows
    const int64_t rows_per_unit = shared ? 1 : s.Q;
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<float> db_local(shared ? size_t(s.R) * NP : 0, 0.f), dWt_local(NP * NP, 0.f), dV1t_local(NP * NH1, 0.f),
            dV2t_local(NH1 * NP, 0.f);
        vf de1_local[HV1];
        for (int u = 0; u < HV1; ++u) de1_local[u] = bcast(0.f);
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < units; ++unit) {
            float *db_rows = shared ? db_local.data() : db + unit * s.b_group_stride;
            for (int64_t m = unit * rows_per_unit; m < (unit + 1) * rows_per_unit; ++m) {
                vf da_row[NV];
                for (int v = 0; v < NV; ++v) da_row[v] = bcast(0.f);
                int64_t r = 0;
                for (; r + RB <= s.R; r += RB)
                    backward_block(RB, L, s, up, m, r, dL, da_row, db_rows, dWt_local.data(), dV1t_local.data(), dV2t_local.data(), de1_local);
                for (; r < s.R; ++r)
                    backward_block(1, L, s, up, m, r, dL, da_row, db_rows, dWt_local.data(), dV1t_local.data(), dV2t_local.data(), de1_local);
                for (int v = 0; v < NV; ++v) storev(da + m * NP + VW * v, da_row[v]);
            }
        }
#pragma omp critical
        {
            for (size_t i = 0; i < db_local.size(); ++i) db[i] += db_local[i];
            if (NH == 0)
                for (int i = 0; i < NP * NP; ++i) dWt[i] += dWt_local[i];
            else  // the diagonal, accumulated in the first row
                for (int k = 0; k < NP; ++k) dWt[k * NP + k] += dWt_local[k];
            for (int i = 0; i < NP * NH; ++i) dV1t[i] += dV1t_local[i];
            for (int i = 0; i < NH * NP; ++i) dV2t[i] += dV2t_local[i];
            for (int u = 0; u < HV; ++u)
                for (int i = 0; i < VW; ++i) de1[VW * u + i] += de1_local[u][i];
        }
    }
}

// ---------------------------------------------------------------------------------------------- the operators

static void check_float(const at::Tensor &t, const char *name, c10::IntArrayRef shape) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "pair_gate: ", name,
                " must be a contiguous float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
    TORCH_CHECK(t.sizes() == shape, "pair_gate: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// The checked inputs as the kernel reads them.
static std::unique_ptr<Gate> make_gate(const at::Tensor &logits, const at::Tensor &a, const at::Tensor &b, const at::Tensor &c,
                                       const at::Tensor &W, const std::optional<at::Tensor> &V1, const std::optional<at::Tensor> &e1,
                                       const std::optional<at::Tensor> &V2, int64_t stat_items, double dropout, int64_t seed) {
    TORCH_CHECK(logits.dim() == 5 && logits.size(2) == NQ && logits.size(4) == NX, "pair_gate: logits must be (G, Q, ", NQ, ", C, ",
                NX, ") for this build, got ", logits.sizes());
    TORCH_CHECK(logits.device().is_cpu() && logits.is_contiguous() &&
                    (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
                "pair_gate: logits must be a contiguous float32 or bfloat16 CPU tensor");
    const int64_t G = logits.size(0), Q = logits.size(1), C = logits.size(3);
    check_float(a, "query gate logits", {G, Q, NP});
    TORCH_CHECK(b.dim() == 3 && (b.size(0) == 1 || b.size(0) == G), "pair_gate: item gate logits must be (1 | G, C, P), got ", b.sizes());
    check_float(b, "item gate logits", {b.size(0), C, NP});
    check_float(c, "bias", {NP});
    check_float(W, "weight", {NP, NP});
    TORCH_CHECK(V1.has_value() == (NH > 0) && e1.has_value() == (NH > 0) && V2.has_value() == (NH > 0),
                "pair_gate: this build's pair gate has ", NH, " hidden units: the MLP weights are ", NH > 0 ? "needed" : "not taken");
    if (NH > 0) {
        check_float(*V1, "hidden weight", {NH, NP});
        check_float(*e1, "hidden bias", {NH});
        check_float(*V2, "output weight", {NP, NH});
    }
    TORCH_CHECK(0.0 <= dropout && dropout < 1.0, "pair_gate: dropout must be in [0, 1), got ", dropout);
    TORCH_CHECK(0 <= seed && seed < (int64_t(1) << 32), "pair_gate: seed must be a 32-bit unsigned value, got ", seed);
    const uint32_t threshold = uint32_t(std::min(std::llround(dropout * 4294967296.0), 4294967295LL));
    const float *no = nullptr;
    return std::make_unique<Gate>(G * Q, C, Q, std::clamp<int64_t>(stat_items, 0, C), b.size(0) == 1 ? 0 : C * NP, a.data_ptr<float>(),
                                  b.data_ptr<float>(), c.data_ptr<float>(), W.data_ptr<float>(), NH > 0 ? V1->data_ptr<float>() : no,
                                  NH > 0 ? e1->data_ptr<float>() : no, NH > 0 ? V2->data_ptr<float>() : no, uint32_t(seed), threshold,
                                  float(1.0 / (1.0 - dropout)));
}

template <typename T>
static const T *data(const at::Tensor &t) { return reinterpret_cast<const T *>(t.const_data_ptr()); }

// scores (G, Q, C), and over the pairs of the first stat_items items of each group the sums of the gates (P,) and of
// their entropies ().
static std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_gate_forward(const at::Tensor &logits, const at::Tensor &a, const at::Tensor &b,
                                                                        const at::Tensor &c, const at::Tensor &W,
                                                                        const std::optional<at::Tensor> &V1,
                                                                        const std::optional<at::Tensor> &e1,
                                                                        const std::optional<at::Tensor> &V2, int64_t stat_items,
                                                                        double dropout, int64_t seed, int64_t num_threads) {
    const auto gate = make_gate(logits, a, b, c, W, V1, e1, V2, stat_items, dropout, seed);
    const auto options = a.options();
    at::Tensor scores = at::empty({logits.size(0), logits.size(1), logits.size(3)}, options);
    at::Tensor usage = at::empty({NP}, options), entropy = at::empty({}, options);
    double usage_sum[NP], entropy_sum;
    if (logits.scalar_type() == at::kBFloat16)
        forward(data<uint16_t>(logits), *gate, scores.data_ptr<float>(), usage_sum, &entropy_sum, int(num_threads));
    else
        forward(data<float>(logits), *gate, scores.data_ptr<float>(), usage_sum, &entropy_sum, int(num_threads));
    for (int p = 0; p < NP; ++p) usage.data_ptr<float>()[p] = float(usage_sum[p]);
    *entropy.data_ptr<float>() = float(entropy_sum);
    return {scores, usage, entropy};
}

// The gradients of the forward's inputs (dlogits, da, db, dc, dW, dV1, de1, dV2; the last three empty without the MLP)
// from those of its outputs; the gates and the dropout mask are recomputed.
static std::vector<at::Tensor> pair_gate_backward(const at::Tensor &logits, const at::Tensor &a, const at::Tensor &b, const at::Tensor &c,
                                                  const at::Tensor &W, const std::optional<at::Tensor> &V1, const std::optional<at::Tensor> &e1,
                                                  const std::optional<at::Tensor> &V2, int64_t stat_items, double dropout, int64_t seed,
                                                  const at::Tensor &dscores, const at::Tensor &dusage, const at::Tensor &dentropy,
                                                  int64_t num_threads) {
    const auto gate = make_gate(logits, a, b, c, W, V1, e1, V2, stat_items, dropout, seed);
    check_float(dscores, "the scores' gradient", {logits.size(0), logits.size(1), logits.size(3)});
    check_float(dusage, "the usage's gradient", {NP});
    check_float(dentropy, "the entropy's gradient", {});
    const auto options = a.options();
    at::Tensor dlogits = at::empty(logits.sizes(), logits.options()), da = at::empty(a.sizes(), options), db = at::zeros(b.sizes(), options);
    std::vector<float> dWt(NP * NP, 0.f), dV1t(NP * NH1, 0.f), dV2t(NH1 * NP, 0.f), de1(NH1, 0.f);
    const Upstream up{dscores.data_ptr<float>(), dusage.data_ptr<float>(), *dentropy.data_ptr<float>()};
    if (logits.scalar_type() == at::kBFloat16)
        backward(data<uint16_t>(logits), *gate, up, reinterpret_cast<uint16_t *>(dlogits.data_ptr()), da.data_ptr<float>(),
                 db.data_ptr<float>(), dWt.data(), dV1t.data(), dV2t.data(), de1.data(), int(num_threads));
    else
        backward(data<float>(logits), *gate, up, dlogits.data_ptr<float>(), da.data_ptr<float>(), db.data_ptr<float>(), dWt.data(),
                 dV1t.data(), dV2t.data(), de1.data(), int(num_threads));
    at::Tensor dc = at::zeros({NP}, options), dW = at::empty({NP, NP}, options);
    const float *da_rows = da.data_ptr<float>();
    for (int64_t m = 0; m < gate->M; ++m)
        for (int p = 0; p < NP; ++p) dc.data_ptr<float>()[p] += da_rows[m * NP + p];  // c enters every pair as a_m does
    Gate::transpose(dWt.data(), NP, NP, dW.data_ptr<float>());
    at::Tensor dV1 = at::empty({NH, NP}, options), de1_out = at::empty({NH}, options), dV2 = at::empty({NP, NH}, options);
    if (NH > 0) {
        Gate::transpose(dV1t.data(), NP, NH, dV1.data_ptr<float>());
        Gate::transpose(dV2t.data(), NH, NP, dV2.data_ptr<float>());
        std::memcpy(de1_out.data_ptr<float>(), de1.data(), NH * sizeof(float));
    }
    return {dlogits, da, db, dc, dW, dV1, de1_out, dV2};
}

// One library per (NQ, NX, NH) build, named by PAIR_GATE_LIBRARY (an indirection, so that the macro is expanded).
#define PAIR_GATE_REGISTER(library, module) TORCH_LIBRARY(library, module)
PAIR_GATE_REGISTER(PAIR_GATE_LIBRARY, module) {
    module.def("forward(Tensor logits, Tensor a, Tensor b, Tensor c, Tensor W, Tensor? V1, Tensor? e1, Tensor? V2, int stat_items, "
               "float dropout, int seed, int num_threads) -> (Tensor, Tensor, Tensor)",
               &pair_gate_forward);
    module.def("backward(Tensor logits, Tensor a, Tensor b, Tensor c, Tensor W, Tensor? V1, Tensor? e1, Tensor? V2, int stat_items, "
               "float dropout, int seed, Tensor dscores, Tensor dusage, Tensor dentropy, int num_threads) -> Tensor[]",
               &pair_gate_backward);
}
