// Just enough of CUDA's device language for src/kernels/cuda/fused.cu to compile as host C++
// and run on the CPU: one OS thread per GPU thread, a block's threads run together (so that
// __syncthreads is a real barrier and __shared__ arrays are shared by them), blocks one after
// another (so that a function-local static array is exactly one block's shared memory).
#pragma once
#include <barrier>
#include <math.h>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct emu_dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}

// kernel<<<grid, block>>>(args...)
template <typename... A, typename... B>
void emu_launch(void (*kernel)(A...), unsigned int grid, unsigned int block, B... args) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned int b = 0; b < grid; b++) {
        std::barrier<> bar(block);
        emu_block_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned int t = 0; t < block; t++)
            threads.emplace_back([=] {
                blockIdx.x = b;
                threadIdx.x = t;
                kernel(args...);
            });
        for (auto& th : threads) th.join();
    }
}
