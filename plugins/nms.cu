// Exact greedy NMS per image, as torchvision.ops.nms on the official class-offset boxes
// (box + cls * 7680, or agnostic): sort the candidates by key (score descending, ties by index),
// IoU bitmask of the first TILE sorted boxes in parallel (64 boxes per word, as torchvision's
// kernel), then one block per image scans it greedily on the GPU; candidates past TILE (rare: only
// when more than TILE survive the threshold) are checked in chunks against the kept boxes.
// Output: dets [B, max_det, 6] (x1, y1, x2, y2, score, class; zero rows past the count), counts [B].
#include "common.cuh"

#define SORT_CHUNK 4096
#define TILE 2048
#define TILE_WORDS (TILE / 64)
#define CHUNK 256  // candidates per step past TILE (= nms_scan's blockDim)

struct Sorted {
    u64* key[2];   // ping-pong buffers [B][capacity]
    u32* slot[2];  // candidate slot of each sorted key
    float4* obox;  // [B][capacity] sorted boxes offset by class (what IoU is computed on)
    u64* mask;     // [B][TILE][TILE_WORDS]; word w of row i: bit j set if IoU(i, 64w+j) > iou, 64w+j > i
    int* kept;     // [B][max_det] sorted indices kept
    float4* kept_box;  // [B][max_det]
    float* dets;   // [B][max_det][6]
    int* counts;   // [B]
    int max_det;
    float iou;
    float class_offset;  // 7680, or 0 for class-agnostic NMS
};

// Buffer selection by branch, not by s.key[src]: a dynamic index would copy the struct to local memory.
__device__ __forceinline__ u64* keys_of(const Sorted& s, int which) { return which ? s.key[1] : s.key[0]; }
__device__ __forceinline__ u32* slots_of(const Sorted& s, int which) { return which ? s.slot[1] : s.slot[0]; }

// torchvision's IoU (nms_kernel.cu devIoU): inter / (area_a + area_b - inter) > threshold, in float.
__device__ __forceinline__ bool iou_above(float4 a, float4 b, float threshold) {
    const float w = fmaxf(fminf(a.z, b.z) - fmaxf(a.x, b.x), 0.0f);
    const float h = fmaxf(fminf(a.w, b.w) - fmaxf(a.y, b.y), 0.0f);
    const float inter = w * h;
    const float area_a = (a.z - a.x) * (a.w - a.y);
    const float area_b = (b.z - b.x) * (b.w - b.y);
    return inter / (area_a + area_b - inter) > threshold;
}

__device__ __forceinline__ float4 offset_box(const Candidates& c, const Sorted& s, long long slot) {
    const float4 b = c.box[slot];
    const float off = (float)c.cls[slot] * s.class_offset;
    return make_float4(b.x + off, b.y + off, b.z + off, b.w + off);
}

// External candidates → the internal lists (key index = position). Grid (ceil(capacity/blockDim), B).
extern "C" __global__ void nms_pack(Candidates c, const float* boxes, const float* scores, const int* classes,
                                   const int* counts) {
    const int b = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    const int n = min(max(counts[b], 0), c.capacity);
    if (i == 0) c.state[b].count = (u32)n;
    if (i >= n) return;
    const long long src = (long long)b * c.capacity + i;
    c.key[src] = sort_key(scores[src], (u32)i);
    c.box[src] = make_float4(boxes[4 * src], boxes[4 * src + 1], boxes[4 * src + 2], boxes[4 * src + 3]);
    c.cls[src] = classes[src];
}

// Bitonic sort of one SORT_CHUNK of (key, slot) pairs in shared memory; block 1024, grid (chunks, B).
// With `last` (a single chunk covers the capacity) it also writes the sorted offset boxes.
extern "C" __global__ void nms_sort_chunks(Candidates c, Sorted s, int last) {
    __shared__ u64 keys[SORT_CHUNK];
    __shared__ u32 slots[SORT_CHUNK];
    const int b = blockIdx.y, start = blockIdx.x * SORT_CHUNK;
    const int n = stored_count(c, b);
    if (start >= n) return;
    const int m = min(n - start, SORT_CHUNK);
    int size = 2;
    while (size < m) size <<= 1;
    const long long row = (long long)b * c.capacity;
    for (int i = threadIdx.x; i < size; i += blockDim.x) {
        keys[i] = i < m ? c.key[row + start + i] : ~0ull;
        slots[i] = start + i;
    }
    __syncthreads();
    for (int span = 2; span <= size; span <<= 1) {
        for (int stride = span >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < size / 2; t += blockDim.x) {
                const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
                const bool ascending = (lo & span) == 0;
                if ((keys[lo] > keys[hi]) == ascending) {
                    const u64 k = keys[lo];
                    keys[lo] = keys[hi], keys[hi] = k;
                    const u32 v = slots[lo];
                    slots[lo] = slots[hi], slots[hi] = v;
                }
            }
            __syncthreads();
        }
    }
    for (int i = threadIdx.x; i < m; i += blockDim.x) {
        s.key[0][row + start + i] = keys[i];
        s.slot[0][row + start + i] = slots[i];
        if (last) s.obox[row + start + i] = offset_box(c, s, row + slots[i]);
    }
}

// One merge round of sorted runs of length `run` (buffer src → 1-src): each element's output position
// is its rank in its own run plus its rank in the partner run (binary search; keys are unique).
// One thread per element, grid (ceil(capacity/blockDim), B). `last` also writes the sorted boxes.
extern "C" __global__ void nms_merge(Candidates c, Sorted s, int run, int src, int last) {
    const int b = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    const int n = stored_count(c, b);
    if (i >= n) return;
    const long long row = (long long)b * c.capacity;
    const u64* keys = keys_of(s, src) + row;
    const int own = i / run, partner_start = (own ^ 1) * run;
    const u64 key = keys[i];
    int out = i;
    if (partner_start < n) {
        int lo = partner_start, hi = min(partner_start + run, n);  // first partner key > key
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (keys[mid] < key) lo = mid + 1;
            else hi = mid;
        }
        out = min(own, own ^ 1) * run + (i - own * run) + (lo - partner_start);
    }
    const u32 slot = slots_of(s, src)[row + i];
    keys_of(s, !src)[row + out] = key;
    slots_of(s, !src)[row + out] = slot;
    if (last) s.obox[row + out] = offset_box(c, s, row + slot);
}

// IoU bitmask of the first min(n, TILE) sorted boxes, one 64x64 tile per block as torchvision's kernel
// does: block (cb, rb, b) with 64 threads fills word cb of rows rb*64.. (upper triangle, cb >= rb), the
// tile's column boxes in shared memory. A grid of row blocks alone left most SMs idle.
extern "C" __global__ void nms_mask(Candidates c, Sorted s) {
    __shared__ float4 cols[64];
    const int b = blockIdx.z, rb = blockIdx.y, cb = blockIdx.x;
    const int nt = min(stored_count(c, b), TILE);
    if (cb < rb || cb * 64 >= nt) return;
    const float4* boxes = s.obox + (long long)b * c.capacity;
    const int n_cols = min(64, nt - cb * 64);
    if (threadIdx.x < n_cols) cols[threadIdx.x] = boxes[cb * 64 + threadIdx.x];
    __syncthreads();
    const int i = rb * 64 + threadIdx.x;
    if (i >= nt) return;
    const float4 box = boxes[i];
    u64 bits = 0;
    for (int j = 0; j < n_cols; ++j)
        if (cb * 64 + j > i && iou_above(box, cols[j], s.iou)) bits |= 1ull << j;
    s.mask[((long long)b * TILE + i) * TILE_WORDS + cb] = bits;
}

// Greedy pass over the tile's bitmask, called by the whole block. Per 64-row word: the block stages
// those rows' words in shared memory (the kept rows' words are then OR-ed from there: one warp reading
// them from global memory, one dependent load after another, was most of a small NMS's time), then
// warp 0 runs the keep/suppress chain on the diagonal word and lane c ORs the kept rows' word c into
// its "removed" word. Returns the number kept (the same in every thread; indices in `kept`).
__device__ int keep_from_mask(const u64* mask, int nt, int max_det, int* kept) {
    __shared__ u64 rows[64][TILE_WORDS];
    __shared__ int shared_kept;
    const int t = threadIdx.x, lane = t & 31;
    const int words = (nt + 63) / 64;
    u64 removed = 0;  // warp 0: lane c holds word c of the removed set
    int n_kept = 0;
    for (int w = 0; w < words && n_kept < max_det; ++w) {
        const int n_rows = min(64, nt - w * 64), span = words - w;
        for (int e = t; e < n_rows * span; e += blockDim.x) {
            const int r = e / span, col = w + e % span;
            rows[r][col] = mask[(long long)(w * 64 + r) * TILE_WORDS + col];
        }
        __syncthreads();
        if (t < 32) {
            const u64 valid = n_rows == 64 ? ~0ull : (1ull << n_rows) - 1;
            u64 pending = ~__shfl_sync(0xffffffffu, removed, w) & valid, keep = 0;
            while (pending && n_kept < max_det) {
                const int j = __ffsll((long long)pending) - 1;
                keep |= 1ull << j;
                ++n_kept;
                pending &= pending - 1;
                pending &= ~rows[j][w];
            }
            const int first = n_kept - __popcll(keep);  // kept rows of this word, written by their lanes
            for (int j = lane; j < 64; j += 32)
                if ((keep >> j) & 1) kept[first + __popcll(keep & ((1ull << j) - 1))] = w * 64 + j;
            if (lane == 0) shared_kept = n_kept;
            if (lane > w && lane < words) {
#pragma unroll 8
                for (int j = 0; j < 64; ++j)  // a fixed trip count lets the shared loads overlap
                    if ((keep >> j) & 1) removed |= rows[j][lane];
            }
        }
        __syncthreads();
        n_kept = shared_kept;
    }
    return n_kept;
}

// Candidates past TILE, CHUNK at a time (one per thread): drop those overlapping a kept box, bitmask
// the rest among themselves, then warp 0 scans the chunk greedily. Returns the new number kept.
__device__ int keep_beyond_tile(const float4* boxes, int n, int n_kept, const Sorted& s, int* kept,
                                float4* kept_box) {
    __shared__ float4 chunk_box[CHUNK];
    __shared__ u64 chunk_mask[CHUNK][CHUNK / 64];
    __shared__ u64 alive_bits[CHUNK / 64];
    __shared__ int shared_kept;
    const int t = threadIdx.x, lane = t & 31;
    for (int start = TILE; start < n && n_kept < s.max_det; start += CHUNK) {
        const bool valid = start + t < n;
        const float4 box = valid ? boxes[start + t] : make_float4(0.f, 0.f, 0.f, 0.f);
        bool alive = valid;
        for (int k = 0; k < n_kept && alive; ++k) alive = !iou_above(kept_box[k], box, s.iou);
        chunk_box[t] = box;
        const u32 ballot = __ballot_sync(0xffffffffu, alive);
        if (lane == 0) reinterpret_cast<u32*>(alive_bits)[t / 32] = ballot;
        __syncthreads();
        for (int w = 0; w < CHUNK / 64; ++w) {
            u64 bits = 0;
            for (int j = 0; alive && j < 64; ++j) {
                const int col = w * 64 + j;
                if (col > t && start + col < n && iou_above(box, chunk_box[col], s.iou)) bits |= 1ull << j;
            }
            chunk_mask[t][w] = bits;
        }
        __syncthreads();
        if (t < 32) {
            u64 removed[CHUNK / 64];
            for (int w = 0; w < CHUNK / 64; ++w) removed[w] = ~alive_bits[w];
            for (int w = 0; w < CHUNK / 64; ++w) {
                u64 pending = ~removed[w];
                while (pending && n_kept < s.max_det) {
                    const int j = __ffsll((long long)pending) - 1, i = w * 64 + j;
                    if (lane == 0) kept[n_kept] = start + i, kept_box[n_kept] = chunk_box[i];
                    ++n_kept;
                    for (int w2 = w; w2 < CHUNK / 64; ++w2) removed[w2] |= chunk_mask[i][w2];
                    pending = ~removed[w] & ~((2ull << j) - 1);  // j == 63: 2ull << 63 == 0
                }
            }
            if (t == 0) shared_kept = n_kept;
        }
        __syncthreads();
        n_kept = shared_kept;
    }
    return n_kept;
}

// One block (CHUNK threads) per image: greedy scan, then write dets/counts. `src` = sorted buffer.
extern "C" __global__ void nms_scan(Candidates c, Sorted s, int src) {
    const int b = blockIdx.x;
    const int n = stored_count(c, b);
    const long long row = (long long)b * c.capacity;
    int* kept = s.kept + (long long)b * s.max_det;
    float4* kept_box = s.kept_box + (long long)b * s.max_det;
    const float4* boxes = s.obox + row;

    int n_kept = keep_from_mask(s.mask + (long long)b * TILE * TILE_WORDS, min(n, TILE), s.max_det, kept);
    if (n > TILE && n_kept < s.max_det) {
        for (int k = threadIdx.x; k < n_kept; k += blockDim.x) kept_box[k] = boxes[kept[k]];
        __syncthreads();
        n_kept = keep_beyond_tile(boxes, n, n_kept, s, kept, kept_box);
    }

    float* dets = s.dets + (long long)b * s.max_det * 6;
    for (int k = threadIdx.x; k < s.max_det; k += blockDim.x) {
        float* d = dets + 6LL * k;
        if (k < n_kept) {
            const u32 i = (u32)kept[k];
            const long long slot = row + slots_of(s, src)[row + i];
            const float4 box = c.box[slot];
            d[0] = box.x, d[1] = box.y, d[2] = box.z, d[3] = box.w;
            d[4] = key_score(keys_of(s, src)[row + i]);
            d[5] = (float)c.cls[slot];
        } else {
            d[0] = d[1] = d[2] = d[3] = d[4] = d[5] = 0.0f;
        }
    }
    if (threadIdx.x == 0) s.counts[b] = n_kept;
}
