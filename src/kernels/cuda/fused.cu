// GPU kernels of the fused ops (src/kernels/fused.rs): the same contracts as the CPU ones,
// for f32 and bf16 storage with f32 arithmetic.
//
// This file is compiled twice: to PTX by nvcc for the `cuda` feature (build.rs), and by a host
// C++ compiler inside tests/cuda_emu/, which runs every kernel on the CPU with one OS thread per
// GPU thread and a barrier for __syncthreads (tests/cuda_kernel_source.rs compares the results
// with the CPU ops). So it uses only what both can provide: no CUDA headers (bf16 is a 16-bit
// integer converted by hand), no warp shuffles (block reductions go through shared memory), a
// fixed block size, no dynamic shared memory.
//
// Launch geometry (src/kernels/cuda/mod.rs follows it):
// - row kernels (one block of KT_BLOCK threads per row): kt_rms_*, kt_csm_*, kt_lsg_*;
// - element kernels (grid-stride loops, any grid, KT_BLOCK threads): kt_rope, kt_silu_*, kt_mul,
//   kt_dropout_mask (its elements are blocks of 16 values).

#define KT_BLOCK 256

typedef unsigned short bf16_t;

__device__ __forceinline__ float kt_ld(const float* p, unsigned long long i) { return p[i]; }
__device__ __forceinline__ float kt_ld(const bf16_t* p, unsigned long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void kt_st(float* p, unsigned long long i, float v) { p[i] = v; }
// Round to nearest even, as candle's (half's) f32 -> bf16 conversion; NaN stays a quiet NaN.
__device__ __forceinline__ void kt_st(bf16_t* p, unsigned long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i] = (bf16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float kt_neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ unsigned int kt_min(unsigned int a, unsigned int b) { return a < b ? a : b; }

// Sum / max over the block's KT_BLOCK threads; every thread gets the result. `buf` is the
// caller's __shared__ float[KT_BLOCK]; it is free again when this returns.
__device__ __forceinline__ float kt_block_sum(float v, float* buf) {
    unsigned int t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (unsigned int s = KT_BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        __syncthreads();
    }
    float r = buf[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float kt_block_max(float v, float* buf) {
    unsigned int t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (unsigned int s = KT_BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) buf[t] = fmaxf(buf[t], buf[t + s]);
        __syncthreads();
    }
    float r = buf[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ unsigned long long kt_first() {
    return (unsigned long long)blockIdx.x * KT_BLOCK + threadIdx.x;
}
__device__ __forceinline__ unsigned long long kt_stride() {
    return (unsigned long long)gridDim.x * KT_BLOCK;
}

__device__ __forceinline__ float kt_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// ------------------------------------------------------------------ RMSNorm, rows of h
// y = x r w, r = (mean x^2 + eps)^-1/2
template <typename T>
__device__ void rms_fwd(const T* x, const T* w, T* y, unsigned int h, float eps) {
    __shared__ float buf[KT_BLOCK];
    unsigned long long base = (unsigned long long)blockIdx.x * h;
    float ss = 0.0f;
    for (unsigned int i = threadIdx.x; i < h; i += KT_BLOCK) {
        float v = kt_ld(x, base + i);
        ss += v * v;
    }
    ss = kt_block_sum(ss, buf);
    float r = 1.0f / sqrtf(ss / (float)h + eps);
    for (unsigned int i = threadIdx.x; i < h; i += KT_BLOCK)
        kt_st(y, base + i, kt_ld(x, base + i) * r * kt_ld(w, i));
}

// dx_j = g_j w_j r - x_j (r^3 / h) sum_i g_i w_i x_i
template <typename T>
__device__ void rms_bwd(const T* x, const T* w, const T* g, T* dx, unsigned int h, float eps) {
    __shared__ float buf[KT_BLOCK];
    unsigned long long base = (unsigned long long)blockIdx.x * h;
    float ss = 0.0f, dot = 0.0f;
    for (unsigned int i = threadIdx.x; i < h; i += KT_BLOCK) {
        float v = kt_ld(x, base + i);
        ss += v * v;
        dot += kt_ld(g, base + i) * kt_ld(w, i) * v;
    }
    ss = kt_block_sum(ss, buf);
    dot = kt_block_sum(dot, buf);
    float r = 1.0f / sqrtf(ss / (float)h + eps);
    float c = dot * r * r * r / (float)h;
    for (unsigned int i = threadIdx.x; i < h; i += KT_BLOCK)
        kt_st(dx, base + i, kt_ld(g, base + i) * kt_ld(w, i) * r - kt_ld(x, base + i) * c);
}

// ------------------------------------------------------------------ RoPE
// x [lead, t, d], tables [t, d]: y = x cos + rotate_half(x) sin; one thread per (i, i + d/2).
template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, unsigned int t, unsigned int d,
                     unsigned long long pairs) {
    unsigned int half = d / 2;
    for (unsigned long long k = kt_first(); k < pairs; k += kt_stride()) {
        unsigned long long row = k / half;  // over lead * t
        unsigned int i = (unsigned int)(k % half);
        unsigned long long p = row % t;
        unsigned long long b = row * d, tb = p * d;
        float x1 = kt_ld(x, b + i), x2 = kt_ld(x, b + i + half);
        kt_st(y, b + i, x1 * kt_ld(cos, tb + i) - x2 * kt_ld(sin, tb + i));
        kt_st(y, b + i + half, x2 * kt_ld(cos, tb + i + half) + x1 * kt_ld(sin, tb + i + half));
    }
}

// ------------------------------------------------------------------ causal softmax, rows of t
// Row r is the query at position offset + r % t_q; keys after it get probability 0.
template <typename T>
__device__ void csm_fwd(const T* s, T* p, unsigned int t, unsigned int t_q, unsigned int offset,
                        float scale) {
    __shared__ float buf[KT_BLOCK];
    unsigned long long row = blockIdx.x, base = row * t;
    unsigned int n = kt_min(offset + (unsigned int)(row % t_q) + 1, t);
    float m = kt_neg_inf();
    for (unsigned int j = threadIdx.x; j < n; j += KT_BLOCK) m = fmaxf(m, kt_ld(s, base + j) * scale);
    m = kt_block_max(m, buf);
    float sum = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += KT_BLOCK) sum += expf(kt_ld(s, base + j) * scale - m);
    float inv = 1.0f / kt_block_sum(sum, buf);
    for (unsigned int j = threadIdx.x; j < t; j += KT_BLOCK)
        kt_st(p, base + j, j < n ? expf(kt_ld(s, base + j) * scale - m) * inv : 0.0f);
}

// ds = scale p (g - sum_j g_j p_j)
template <typename T>
__device__ void csm_bwd(const T* p, const T* g, T* ds, unsigned int t, float scale) {
    __shared__ float buf[KT_BLOCK];
    unsigned long long base = (unsigned long long)blockIdx.x * t;
    float dot = 0.0f;
    for (unsigned int j = threadIdx.x; j < t; j += KT_BLOCK) dot += kt_ld(p, base + j) * kt_ld(g, base + j);
    dot = kt_block_sum(dot, buf);
    for (unsigned int j = threadIdx.x; j < t; j += KT_BLOCK)
        kt_st(ds, base + j, scale * kt_ld(p, base + j) * (kt_ld(g, base + j) - dot));
}

// ------------------------------------------------------------------ SwiGLU and masks
template <typename T>
__device__ void silu_mul(const T* g, const T* u, T* y, unsigned long long n) {
    for (unsigned long long k = kt_first(); k < n; k += kt_stride()) {
        float a = kt_ld(g, k);
        kt_st(y, k, a * kt_sigmoid(a) * kt_ld(u, k));
    }
}

// d/dg of silu(g) u, times the incoming gradient o
template <typename T>
__device__ void silu_mul_bwd_g(const T* g, const T* u, const T* o, T* dg, unsigned long long n) {
    for (unsigned long long k = kt_first(); k < n; k += kt_stride()) {
        float a = kt_ld(g, k), s = kt_sigmoid(a);
        kt_st(dg, k, kt_ld(o, k) * kt_ld(u, k) * s * (1.0f + a * (1.0f - s)));
    }
}

template <typename T>
__device__ void mul(const T* x, const T* m, T* y, unsigned long long n) {
    for (unsigned long long k = kt_first(); k < n; k += kt_stride()) kt_st(y, k, kt_ld(x, k) * kt_ld(m, k));
}

// ------------------------------------------------------------------ log-softmax + gather, rows of v
template <typename T>
__device__ float kt_row_lse(const T* x, unsigned long long base, unsigned int v, float* buf) {
    float m = kt_neg_inf();
    for (unsigned int j = threadIdx.x; j < v; j += KT_BLOCK) m = fmaxf(m, kt_ld(x, base + j));
    m = kt_block_max(m, buf);
    float sum = 0.0f;
    for (unsigned int j = threadIdx.x; j < v; j += KT_BLOCK) sum += expf(kt_ld(x, base + j) - m);
    return m + logf(kt_block_sum(sum, buf));
}

// y[row] = x[row, target] - logsumexp(x[row]); y is written in the logits' dtype.
template <typename T>
__device__ void lsg_fwd(const T* x, const unsigned int* target, T* y, unsigned int v) {
    __shared__ float buf[KT_BLOCK];
    unsigned long long row = blockIdx.x, base = row * v;
    float l = kt_row_lse(x, base, v, buf);
    if (threadIdx.x == 0) kt_st(y, row, kt_ld(x, base + target[row]) - l);
}

// dx = g (onehot(target) - softmax(x))
template <typename T>
__device__ void lsg_bwd(const T* x, const unsigned int* target, const T* g, T* dx, unsigned int v) {
    __shared__ float buf[KT_BLOCK];
    unsigned long long row = blockIdx.x, base = row * v;
    float l = kt_row_lse(x, base, v, buf);
    float gi = kt_ld(g, row);
    unsigned int k = target[row];
    for (unsigned int j = threadIdx.x; j < v; j += KT_BLOCK) {
        float d = -gi * expf(kt_ld(x, base + j) - l);
        if (j == k) d += gi;
        kt_st(dx, base + j, d);
    }
}

// ------------------------------------------------------------------ dropout masks
// The inverted-dropout mask of src/model/lora.rs, value for value: word i of the ChaCha8 stream
// (key = the 32-byte seed rand_chacha derives from the mask's u64 seed, stream 0, 64-bit block
// counter) gives 0 when below `threshold` (p 2^32), else `keep` (1 / (1 - p)). One thread per
// 64-byte block of the stream, i.e. 16 values.
#define KT_ROTL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))
#define KT_QR(a, b, c, d)                                                                            \
    a += b; d ^= a; d = KT_ROTL(d, 16);                                                              \
    c += d; b ^= c; b = KT_ROTL(b, 12);                                                              \
    a += b; d ^= a; d = KT_ROTL(d, 8);                                                               \
    c += d; b ^= c; b = KT_ROTL(b, 7);

template <typename T>
__device__ void dropout_mask(const unsigned int* key, unsigned long long threshold, float keep, T* out,
                             unsigned long long n) {
    unsigned long long blocks = (n + 15) / 16;
    for (unsigned long long blk = kt_first(); blk < blocks; blk += kt_stride()) {
        unsigned int s[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                              key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
                              (unsigned int)blk, (unsigned int)(blk >> 32), 0u, 0u};
        unsigned int x[16];
        for (int i = 0; i < 16; i++) x[i] = s[i];
        for (int r = 0; r < 4; r++) {  // ChaCha8: four double rounds
            KT_QR(x[0], x[4], x[8], x[12]) KT_QR(x[1], x[5], x[9], x[13])
            KT_QR(x[2], x[6], x[10], x[14]) KT_QR(x[3], x[7], x[11], x[15])
            KT_QR(x[0], x[5], x[10], x[15]) KT_QR(x[1], x[6], x[11], x[12])
            KT_QR(x[2], x[7], x[8], x[13]) KT_QR(x[3], x[4], x[9], x[14])
        }
        for (int j = 0; j < 16; j++) {
            unsigned long long i = blk * 16 + j;
            if (i < n) kt_st(out, i, (unsigned long long)(x[j] + s[j]) < threshold ? 0.0f : keep);
        }
    }
}

// ------------------------------------------------------------------ entry points, per dtype
#define KT_ENTRY_POINTS(T, SUF)                                                                      \
    extern "C" __global__ void kt_rms_fwd_##SUF(const T* x, const T* w, T* y, unsigned int h,       \
                                                float eps) {                                         \
        rms_fwd<T>(x, w, y, h, eps);                                                                 \
    }                                                                                                \
    extern "C" __global__ void kt_rms_bwd_##SUF(const T* x, const T* w, const T* g, T* dx,          \
                                                unsigned int h, float eps) {                         \
        rms_bwd<T>(x, w, g, dx, h, eps);                                                             \
    }                                                                                                \
    extern "C" __global__ void kt_rope_##SUF(const T* x, const T* c, const T* s, T* y,              \
                                             unsigned int t, unsigned int d,                         \
                                             unsigned long long pairs) {                             \
        rope<T>(x, c, s, y, t, d, pairs);                                                            \
    }                                                                                                \
    extern "C" __global__ void kt_csm_fwd_##SUF(const T* s, T* p, unsigned int t, unsigned int t_q, \
                                                unsigned int offset, float scale) {                  \
        csm_fwd<T>(s, p, t, t_q, offset, scale);                                                     \
    }                                                                                                \
    extern "C" __global__ void kt_csm_bwd_##SUF(const T* p, const T* g, T* ds, unsigned int t,      \
                                                float scale) {                                       \
        csm_bwd<T>(p, g, ds, t, scale);                                                              \
    }                                                                                                \
    extern "C" __global__ void kt_silu_mul_##SUF(const T* g, const T* u, T* y,                      \
                                                 unsigned long long n) {                             \
        silu_mul<T>(g, u, y, n);                                                                     \
    }                                                                                                \
    extern "C" __global__ void kt_silu_mul_bwd_##SUF(const T* g, const T* u, const T* o, T* dg,     \
                                                     unsigned long long n) {                         \
        silu_mul_bwd_g<T>(g, u, o, dg, n);                                                           \
    }                                                                                                \
    extern "C" __global__ void kt_mul_##SUF(const T* x, const T* m, T* y, unsigned long long n) {   \
        mul<T>(x, m, y, n);                                                                          \
    }                                                                                                \
    extern "C" __global__ void kt_lsg_fwd_##SUF(const T* x, const unsigned int* target, T* y,       \
                                                unsigned int v) {                                    \
        lsg_fwd<T>(x, target, y, v);                                                                 \
    }                                                                                                \
    extern "C" __global__ void kt_lsg_bwd_##SUF(const T* x, const unsigned int* target, const T* g, \
                                                T* dx, unsigned int v) {                             \
        lsg_bwd<T>(x, target, g, dx, v);                                                             \
    }                                                                                                \
    extern "C" __global__ void kt_dropout_mask_##SUF(const unsigned int* key,                        \
                                                     unsigned long long threshold, float keep, T* out,  \
                                                     unsigned long long n) {                         \
        dropout_mask<T>(key, threshold, keep, out, n);                                               \
    }

KT_ENTRY_POINTS(float, f32)
KT_ENTRY_POINTS(bf16_t, bf16)
