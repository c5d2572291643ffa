// Shared by decode.cu and nms.cu: the per-image candidate lists and their sort keys.
// Every module is compiled with --fmad=false, so float expressions round exactly like the
// PyTorch/NumPy code they reproduce (no fused multiply-adds).
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;

// 32 bytes per image, zeroed before each decode.
struct ImageState {
    u32 count;    // true number of candidates above the threshold (may exceed capacity)
    u32 emitted;  // slots written by the overflow re-emit pass
    u32 done;     // blocks finished (last-block-done pattern)
    u32 rank;     // overflow select: rank of the sought key among the keys still matching `prefix`
    u64 prefix;   // overflow select: high digits of the capacity-th smallest key found so far
    u64 spare;
};

// Per image `capacity` slots; a slot holds a box (x1, y1, x2, y2), a class and a sort key.
struct Candidates {
    ImageState* state;  // [B]
    u32* hist;          // [B][65536] overflow-select histogram (zeroed only when an image overflows)
    u64* key;           // [B][capacity]
    float4* box;        // [B][capacity]
    int* cls;           // [B][capacity]
    int capacity;
};

// Ascending keys = descending score, ties by candidate index (anchor, then class): the official
// stable sort order. Scores are positive, so their bit patterns order like the floats.
__device__ __forceinline__ u64 sort_key(float score, u32 index) {
    return ((u64)(~__float_as_uint(score)) << 32) | index;
}

__device__ __forceinline__ float key_score(u64 key) { return __uint_as_float(~(u32)(key >> 32)); }

__device__ __forceinline__ int stored_count(const Candidates& c, int b) {
    return (int)min(c.state[b].count, (u32)c.capacity);
}

// True in the one block of the grid row (gridDim.x blocks) that finishes last; its reads of what the
// other blocks wrote must bypass L1 (__ldcg).
__device__ __forceinline__ bool last_block_done(u32* counter) {
    __shared__ bool is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    return is_last;
}

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
