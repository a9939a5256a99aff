// Runs one kernel of src/kernels/cuda/fused.cu on the CPU (emu.h) over raw little-endian
// buffers that tests/cuda_kernel_source.rs writes, with the launch geometry that
// src/kernels/cuda/mod.rs uses on a GPU:
//   harness OP DTYPE ARGS... DIR
// reads DIR/<input>.bin, writes DIR/out.bin. DTYPE: f32 | bf16 (targets are u32).
#include "emu.h"
#include "../../src/kernels/cuda/fused.cu"
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

template <typename T>
static std::vector<T> load(const std::string& dir, const char* name) {
    std::ifstream f(dir + "/" + name + ".bin", std::ios::binary | std::ios::ate);
    if (!f) {
        std::fprintf(stderr, "cannot read %s/%s.bin\n", dir.c_str(), name);
        std::exit(2);
    }
    std::vector<T> v(f.tellg() / sizeof(T));
    f.seekg(0);
    f.read(reinterpret_cast<char*>(v.data()), v.size() * sizeof(T));
    return v;
}

template <typename T>
static void save(const std::string& dir, const std::vector<T>& v) {
    std::ofstream f(dir + "/out.bin", std::ios::binary);
    f.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// The element kernels are grid-stride loops; a small grid makes every thread take several
// strides, which is the case a wrong stride would break.
static unsigned int element_grid(unsigned long long n) {
    unsigned long long g = (n + KT_BLOCK - 1) / KT_BLOCK;
    return g > 3 ? 3 : (unsigned int)(g == 0 ? 1 : g);
}


template <typename T>
static int run(const std::string& op, char** a, int n, const std::string& dir, bool bf16) {
    auto u = [&](int i) { return (unsigned int)std::strtoul(a[i], nullptr, 10); };
    auto f = [&](int i) { return std::strtof(a[i], nullptr); };
    using K1 = void (*)(const T*, const T*, T*, unsigned int, float);
    if (op == "rms_fwd") {  // rows h eps
        auto x = load<T>(dir, "x"), w = load<T>(dir, "w");
        std::vector<T> y(x.size());
        auto k = bf16 ? (void*)kt_rms_fwd_bf16 : (void*)kt_rms_fwd_f32;
        emu_launch((K1)k, u(0), KT_BLOCK, (const T*)x.data(), (const T*)w.data(), y.data(), u(1), f(2));
        save(dir, y);
    } else if (op == "rms_bwd") {  // rows h eps
        auto x = load<T>(dir, "x"), w = load<T>(dir, "w"), g = load<T>(dir, "g");
        std::vector<T> dx(x.size());
        using K = void (*)(const T*, const T*, const T*, T*, unsigned int, float);
        auto k = bf16 ? (void*)kt_rms_bwd_bf16 : (void*)kt_rms_bwd_f32;
        emu_launch((K)k, u(0), KT_BLOCK, (const T*)x.data(), (const T*)w.data(), (const T*)g.data(), dx.data(), u(1),
                   f(2));
        save(dir, dx);
    } else if (op == "rope") {  // t d
        auto x = load<T>(dir, "x"), c = load<T>(dir, "cos"), s = load<T>(dir, "sin");
        std::vector<T> y(x.size());
        unsigned long long pairs = x.size() / 2;
        using K = void (*)(const T*, const T*, const T*, T*, unsigned int, unsigned int, unsigned long long);
        auto k = bf16 ? (void*)kt_rope_bf16 : (void*)kt_rope_f32;
        emu_launch((K)k, element_grid(pairs), KT_BLOCK, (const T*)x.data(), (const T*)c.data(), (const T*)s.data(),
                   y.data(), u(0), u(1), pairs);
        save(dir, y);
    } else if (op == "csm_fwd") {  // rows t t_q offset scale
        auto s = load<T>(dir, "s");
        std::vector<T> p(s.size());
        using K = void (*)(const T*, T*, unsigned int, unsigned int, unsigned int, float);
        auto k = bf16 ? (void*)kt_csm_fwd_bf16 : (void*)kt_csm_fwd_f32;
        emu_launch((K)k, u(0), KT_BLOCK, (const T*)s.data(), p.data(), u(1), u(2), u(3), f(4));
        save(dir, p);
    } else if (op == "csm_bwd") {  // rows t scale
        auto p = load<T>(dir, "p"), g = load<T>(dir, "g");
        std::vector<T> ds(p.size());
        using K = void (*)(const T*, const T*, T*, unsigned int, float);
        auto k = bf16 ? (void*)kt_csm_bwd_bf16 : (void*)kt_csm_bwd_f32;
        emu_launch((K)k, u(0), KT_BLOCK, (const T*)p.data(), (const T*)g.data(), ds.data(), u(1), f(2));
        save(dir, ds);
    } else if (op == "silu_mul" || op == "mul") {
        auto x = load<T>(dir, "x"), m = load<T>(dir, "m");
        std::vector<T> y(x.size());
        using K = void (*)(const T*, const T*, T*, unsigned long long);
        void* k = op == "mul" ? (bf16 ? (void*)kt_mul_bf16 : (void*)kt_mul_f32)
                              : (bf16 ? (void*)kt_silu_mul_bf16 : (void*)kt_silu_mul_f32);
        emu_launch((K)k, element_grid(x.size()), KT_BLOCK, (const T*)x.data(), (const T*)m.data(), y.data(),
                   (unsigned long long)x.size());
        save(dir, y);
    } else if (op == "silu_mul_bwd") {
        auto g = load<T>(dir, "x"), uu = load<T>(dir, "m"), o = load<T>(dir, "g");
        std::vector<T> dg(g.size());
        using K = void (*)(const T*, const T*, const T*, T*, unsigned long long);
        auto k = bf16 ? (void*)kt_silu_mul_bwd_bf16 : (void*)kt_silu_mul_bwd_f32;
        emu_launch((K)k, element_grid(g.size()), KT_BLOCK, (const T*)g.data(), (const T*)uu.data(),
                   (const T*)o.data(), dg.data(), (unsigned long long)g.size());
        save(dir, dg);
    } else if (op == "lsg_fwd") {  // rows v
        auto x = load<T>(dir, "x");
        auto t = load<unsigned int>(dir, "target");
        std::vector<T> y(u(0));
        using K = void (*)(const T*, const unsigned int*, T*, unsigned int);
        auto k = bf16 ? (void*)kt_lsg_fwd_bf16 : (void*)kt_lsg_fwd_f32;
        emu_launch((K)k, u(0), KT_BLOCK, (const T*)x.data(), (const unsigned int*)t.data(), y.data(), u(1));
        save(dir, y);
    } else if (op == "lsg_bwd") {  // rows v
        auto x = load<T>(dir, "x"), g = load<T>(dir, "g");
        auto t = load<unsigned int>(dir, "target");
        std::vector<T> dx(x.size());
        using K = void (*)(const T*, const unsigned int*, const T*, T*, unsigned int);
        auto k = bf16 ? (void*)kt_lsg_bwd_bf16 : (void*)kt_lsg_bwd_f32;
        emu_launch((K)k, u(0), KT_BLOCK, (const T*)x.data(), (const unsigned int*)t.data(), (const T*)g.data(),
                   dx.data(), u(1));
        save(dir, dx);
    } else if (op == "dropout") {  // threshold keep n; key.bin: 8 u32 words
        auto key = load<unsigned int>(dir, "key");
        unsigned long long n = std::strtoull(a[2], nullptr, 10);
        std::vector<T> out(n);
        using K = void (*)(const unsigned int*, unsigned long long, float, T*, unsigned long long);
        auto k = bf16 ? (void*)kt_dropout_mask_bf16 : (void*)kt_dropout_mask_f32;
        emu_launch((K)k, element_grid((n + 15) / 16), KT_BLOCK, (const unsigned int*)key.data(),
                   std::strtoull(a[0], nullptr, 10), f(1), out.data(), n);
        save(dir, out);
    } else {
        std::fprintf(stderr, "unknown op %s\n", op.c_str());
        return 2;
    }
    (void)n;
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: harness OP f32|bf16 ARGS... DIR\n");
        return 2;
    }
    std::string op = argv[1], dtype = argv[2], dir = argv[argc - 1];
    bool bf16 = dtype == "bf16";
    if (bf16) return run<bf16_t>(op, argv + 3, argc - 4, dir, true);
    return run<float>(op, argv + 3, argc - 4, dir, false);
}
