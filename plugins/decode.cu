// Two heads feed the same candidate lists (the kernels below are templates over the head):
// YOLOv5 Detect decode: raw head maps [B, na*(nc+5), h, w] (float or half) per level → per-image
// candidates above the confidence threshold, with the official math (sigmoid; xy = (2s + grid - 0.5)
// * stride; wh = (2s)^2 * anchor; score = obj * cls; obj > conf and score > conf; xywh → xyxy).
//
// When an image has more candidates than its capacity, the highest scores are kept exactly (as the
// official sort + [:max_nms]): a radix select over the 64-bit sort keys finds the capacity-th
// smallest key in four 16-bit passes (recomputing the decode each pass), then a re-emit pass
// rewrites the slots with the keys up to it. The true count stays in ImageState.count.
//
// Anchor-free (YOLOv8/YOLO11 Detect inference output [B, 4 + nc, N], float or half: cx, cy, w, h in
// input pixels, then class scores after sigmoid, no objectness), as Ultralytics' non_max_suppression:
// max score > conf (or each score > conf with multi_label); xywh → xyxy with w / 2.
#include "common.cuh"

#define MAX_LEVELS 5
#define MAX_ANCHORS 4
#define HIST_BINS 65536

struct Heads {
    const void* ptr[MAX_LEVELS];
    int h[MAX_LEVELS];
    int w[MAX_LEVELS];
    int first[MAX_LEVELS + 1];  // global index of each level's first anchor; first[levels] = total
    float stride[MAX_LEVELS];
    float anchor[MAX_LEVELS][MAX_ANCHORS][2];  // pixels
    int levels, na, nc, half, multi_label;
    float conf;
};

__device__ __forceinline__ float head_value(const Heads& p, int level, long long i) {
    if (p.half) return half_to_float(__ldg((const unsigned short*)p.ptr[level] + i));
    return __ldg((const float*)p.ptr[level] + i);
}

struct Predictions {
    const void* ptr;  // [B][4 + nc][n]
    int n, nc, half, multi_label;
    float conf;
};

__device__ __forceinline__ int anchor_count(const Heads& p) { return p.first[p.levels]; }
__device__ __forceinline__ int anchor_count(const Predictions& p) { return p.n; }

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// Calls emit(key, box, cls) for each candidate of anchor `gid` (global: level, anchor, y, x order) of
// image b; returns how many.
template <class Emit>
__device__ int visit_anchor(const Heads& p, int b, int gid, Emit&& emit) {
    int l = 0;
    while (l + 1 < p.levels && gid >= p.first[l + 1]) ++l;
    const int hw = p.h[l] * p.w[l], local = gid - p.first[l];
    const int a = local / hw, pix = local - a * hw;
    const int y = pix / p.w[l], x = pix - y * p.w[l];
    const long long base = ((long long)b * p.na + a) * (p.nc + 5) * hw + pix;

    const float obj = sigmoid(head_value(p, l, base + 4LL * hw));
    if (!(obj > p.conf)) return 0;
    const float cx = (sigmoid(head_value(p, l, base)) * 2.0f + ((float)x - 0.5f)) * p.stride[l];
    const float cy = (sigmoid(head_value(p, l, base + hw)) * 2.0f + ((float)y - 0.5f)) * p.stride[l];
    const float tw = sigmoid(head_value(p, l, base + 2LL * hw)) * 2.0f;
    const float th = sigmoid(head_value(p, l, base + 3LL * hw)) * 2.0f;
    const float half_w = tw * tw * p.anchor[l][a][0] / 2.0f, half_h = th * th * p.anchor[l][a][1] / 2.0f;
    const float4 box = make_float4(cx - half_w, cy - half_h, cx + half_w, cy + half_h);

    const u32 first_index = (u32)gid * (u32)p.nc;
    if (p.multi_label && p.nc > 1) {
        int n = 0;
        for (int c = 0; c < p.nc; ++c) {
            const float score = sigmoid(head_value(p, l, base + (5LL + c) * hw)) * obj;
            if (score > p.conf) {
                emit(sort_key(score, first_index + c), box, c);
                ++n;
            }
        }
        return n;
    }
    float best = -1.0f;
    int best_c = 0;
    for (int c = 0; c < p.nc; ++c) {  // first maximum wins, as torch.max
        const float score = sigmoid(head_value(p, l, base + (5LL + c) * hw)) * obj;
        if (score > best) best = score, best_c = c;
    }
    if (!(best > p.conf)) return 0;
    emit(sort_key(best, first_index + best_c), box, best_c);
    return 1;
}

__device__ __forceinline__ float prediction(const Predictions& p, int b, int row, int gid) {
    const long long i = ((long long)b * (4 + p.nc) + row) * p.n + gid;
    if (p.half) return half_to_float(__ldg((const unsigned short*)p.ptr + i));
    return __ldg((const float*)p.ptr + i);
}

// ops.xywh2xyxy: xy -/+ wh / 2
__device__ __forceinline__ float4 xywh_to_xyxy(const Predictions& p, int b, int gid) {
    const float cx = prediction(p, b, 0, gid), cy = prediction(p, b, 1, gid);
    const float half_w = prediction(p, b, 2, gid) / 2.0f, half_h = prediction(p, b, 3, gid) / 2.0f;
    return make_float4(cx - half_w, cy - half_h, cx + half_w, cy + half_h);
}

// Calls emit(key, box, cls) for each candidate of box `gid` of image b (the anchor-free head).
template <class Emit>
__device__ int visit_anchor(const Predictions& p, int b, int gid, Emit&& emit) {
    const u32 first_index = (u32)gid * (u32)p.nc;
    if (p.multi_label && p.nc > 1) {
        int n = 0;
        float4 box;
        for (int c = 0; c < p.nc; ++c) {
            const float score = prediction(p, b, 4 + c, gid);
            if (!(score > p.conf)) continue;
            if (n == 0) box = xywh_to_xyxy(p, b, gid);
            emit(sort_key(score, first_index + c), box, c);
            ++n;
        }
        return n;
    }
    float best = prediction(p, b, 4, gid);
    int best_c = 0;
    for (int c = 1; c < p.nc; ++c) {  // first maximum wins, as torch.max
        const float score = prediction(p, b, 4 + c, gid);
        if (score > best) best = score, best_c = c;
    }
    if (!(best > p.conf)) return 0;
    emit(sort_key(best, first_index + best_c), xywh_to_xyxy(p, b, gid), best_c);
    return 1;
}

__device__ __forceinline__ void store(const Candidates& c, int b, u32 slot, u64 key, float4 box, int cls) {
    const long long i = (long long)b * c.capacity + slot;
    c.key[i] = key;
    c.box[i] = box;
    c.cls[i] = cls;
}

// One thread per anchor, grid (ceil(total/blockDim), B). Slots are claimed with one atomic per warp;
// the last block of an image that overflowed prepares the radix select.
template <class Head>
__device__ void decode_body(const Head& p, Candidates c) {
    const int b = blockIdx.y, lane = threadIdx.x & 31;
    const int gid = blockIdx.x * blockDim.x + threadIdx.x;
    const bool single = !(p.multi_label && p.nc > 1);
    u64 key0 = 0;
    float4 box0;
    int cls0 = 0;
    int n = 0;
    if (gid < anchor_count(p))
        n = visit_anchor(p, b, gid, [&](u64 key, float4 box, int cls) {
            if (single) key0 = key, box0 = box, cls0 = cls;
        });

    int before = n;  // inclusive warp scan of n
    for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, before, d);
        if (lane >= d) before += v;
    }
    u32 base = 0;
    if (lane == 31 && before > 0) base = atomicAdd(&c.state[b].count, (u32)before);
    base = __shfl_sync(0xffffffffu, base, 31);
    u32 slot = base + (u32)(before - n);

    if (n > 0) {
        if (single) {
            if (slot < (u32)c.capacity) store(c, b, slot, key0, box0, cls0);
        } else {
            visit_anchor(p, b, gid, [&](u64 key, float4 box, int cls) {
                if (slot < (u32)c.capacity) store(c, b, slot, key, box, cls);
                ++slot;
            });
        }
    }

    ImageState& st = c.state[b];
    if (last_block_done(&st.done)) {
        if (__ldcg(&st.count) > (u32)c.capacity) {
            u32* hist = c.hist + (long long)b * HIST_BINS;
            for (int i = threadIdx.x; i < HIST_BINS; i += blockDim.x) hist[i] = 0;
            if (threadIdx.x == 0) st.rank = (u32)c.capacity, st.prefix = 0;
        }
        if (threadIdx.x == 0) st.done = 0;
    }
}

// Overflow pass `pass` (0..3) of the radix select: histogram of key bits [48-16*pass, 64-16*pass) over
// the keys whose higher digits equal `prefix`; the last block picks the digit holding the rank-th key.
// Grid (any, B), grid-stride over anchors; a no-op for images that did not overflow.
template <class Head>
__device__ void select_digit_body(const Head& p, Candidates c, int pass) {
    const int b = blockIdx.y;
    ImageState& st = c.state[b];
    if (st.count <= (u32)c.capacity) return;
    const int shift = 48 - 16 * pass;
    const u64 high_mask = pass == 0 ? 0ull : ~0ull << (shift + 16);
    const u64 prefix = st.prefix;
    u32* hist = c.hist + (long long)b * HIST_BINS;

    const int total = anchor_count(p);
    for (int gid = blockIdx.x * blockDim.x + threadIdx.x; gid < total; gid += gridDim.x * blockDim.x) {
        u32 run_bin = 0, run_n = 0;  // equal neighbouring digits share one atomic (all-equal scores)
        visit_anchor(p, b, gid, [&](u64 key, float4, int) {
            if ((key ^ prefix) & high_mask) return;
            const u32 bin = (u32)(key >> shift) & (HIST_BINS - 1);
            if (run_n && bin != run_bin) atomicAdd(&hist[run_bin], run_n), run_n = 0;
            run_bin = bin;
            ++run_n;
        });
        if (run_n) atomicAdd(&hist[run_bin], run_n);
    }

    if (!last_block_done(&st.done)) return;
    __shared__ u32 partial[1024];
    const int per_thread = HIST_BINS / blockDim.x;
    u32 sum = 0;
    for (int i = 0; i < per_thread; ++i) sum += __ldcg(&hist[threadIdx.x * per_thread + i]);
    partial[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 rank = st.rank, t = 0;
        while (partial[t] < rank) rank -= partial[t++];
        u32 digit = t * per_thread;
        for (u32 h = __ldcg(&hist[digit]); h < rank; h = __ldcg(&hist[++digit])) rank -= h;
        st.rank = rank;
        st.prefix = prefix | ((u64)digit << shift);
        st.done = 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < HIST_BINS; i += blockDim.x) hist[i] = 0;
}

// After the select: rewrite an overflowed image's slots with exactly the `capacity` smallest keys
// (key <= the selected key). Grid (any, B), grid-stride over anchors.
template <class Head>
__device__ void emit_top_body(const Head& p, Candidates c) {
    const int b = blockIdx.y;
    ImageState& st = c.state[b];
    if (st.count <= (u32)c.capacity) return;
    const u64 limit = st.prefix;
    const int total = anchor_count(p);
    for (int gid = blockIdx.x * blockDim.x + threadIdx.x; gid < total; gid += gridDim.x * blockDim.x) {
        visit_anchor(p, b, gid, [&](u64 key, float4 box, int cls) {
            if (key > limit) return;
            const u32 slot = atomicAdd(&st.emitted, 1u);
            if (slot < (u32)c.capacity) store(c, b, slot, key, box, cls);
        });
    }
}

extern "C" __global__ void decode_candidates(Heads p, Candidates c) { decode_body(p, c); }
extern "C" __global__ void select_digit(Heads p, Candidates c, int pass) { select_digit_body(p, c, pass); }
extern "C" __global__ void emit_top(Heads p, Candidates c) { emit_top_body(p, c); }

extern "C" __global__ void decode_anchor_free(Predictions p, Candidates c) { decode_body(p, c); }
extern "C" __global__ void select_digit_anchor_free(Predictions p, Candidates c, int pass) {
    select_digit_body(p, c, pass);
}
extern "C" __global__ void emit_top_anchor_free(Predictions p, Candidates c) { emit_top_body(p, c); }
