// Letterbox: a batch of uint8 BGR HWC images of any sizes → network input NCHW RGB / 255 (float or
// half) at the engine size, as the official letterbox (cv2.resize INTER_LINEAR, border 114).
// The bilinear weights are OpenCV's 11-bit fixed point, rounded as its SIMD 8-bit path does, so
// downscales match cv2 bit for bit (within 1 of 255 elsewhere; cv2's own paths differ by that much).
#include "common.cuh"

#define MAX_IMAGES 64
#define COEF_SCALE 2048.0f  // INTER_RESIZE_COEF_SCALE

struct Image {
    const unsigned char* src;
    int h, w, pitch;  // pitch: bytes per source row
    int new_w, new_h, left, top;
    double scale_x, scale_y;  // source pixels per resized pixel, as cv2 computes them
};

struct Batch {
    Image image[MAX_IMAGES];
    void* out;  // [N, 3, out_h, out_w]
    int first;  // batch index of image[0]
    int out_h, out_w, half, pad;
};

struct Tap {
    int i0, i1;  // source indices
    int c0, c1;  // fixed-point weights
};

// cv2 resize (INTER_LINEAR) coordinate mapping, clamped at the edges, and its fixed-point weights.
__device__ __forceinline__ Tap tap(int d, double scale, int size) {
    float f = (float)((d + 0.5) * scale - 0.5);
    int i = (int)floorf(f);
    f -= (float)i;
    if (i < 0) f = 0.0f, i = 0;
    if (i >= size - 1) f = 0.0f, i = size - 1;
    Tap t;
    t.i0 = i;
    t.i1 = min(i + 1, size - 1);
    t.c0 = __float2int_rn((1.0f - f) * COEF_SCALE);
    t.c1 = __float2int_rn(f * COEF_SCALE);
    return t;
}

// One thread per output pixel (all 3 channels); block (32, 8), grid (ceil(out_w/32), ceil(out_h/8), images).
extern "C" __global__ void letterbox(Batch batch) {
    const Image& im = batch.image[blockIdx.z];
    const int ox = blockIdx.x * blockDim.x + threadIdx.x, oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= batch.out_w || oy >= batch.out_h) return;
    const int dx = ox - im.left, dy = oy - im.top;
    int bgr[3] = {114, 114, 114};
    if (dx >= 0 && dx < im.new_w && dy >= 0 && dy < im.new_h) {
        const Tap tx = tap(dx, im.scale_x, im.w), ty = tap(dy, im.scale_y, im.h);
        const unsigned char* row0 = im.src + (long long)ty.i0 * im.pitch;
        const unsigned char* row1 = im.src + (long long)ty.i1 * im.pitch;
        for (int c = 0; c < 3; ++c) {
            const int s0 = row0[3 * tx.i0 + c] * tx.c0 + row0[3 * tx.i1 + c] * tx.c1;
            const int s1 = row1[3 * tx.i0 + c] * tx.c0 + row1[3 * tx.i1 + c] * tx.c1;
            // v_mul_hi(s >> 4, beta) per row, then a rounding shift by 2 (VResizeLinearVec_32s8u)
            const int v = (((s0 >> 4) * ty.c0) >> 16) + (((s1 >> 4) * ty.c1) >> 16);
            bgr[c] = min(max((v + 2) >> 2, 0), 255);
        }
    }
    const long long plane = (long long)batch.out_h * batch.out_w;
    const long long at = (long long)(batch.first + blockIdx.z) * 3 * plane + (long long)oy * batch.out_w + ox;
    for (int c = 0; c < 3; ++c) {  // output channel c is RGB: source channel 2 - c
        const float value = (float)bgr[2 - c] / 255.0f;
        if (batch.half) ((unsigned short*)batch.out)[at + c * plane] = float_to_half(value);
        else ((float*)batch.out)[at + c * plane] = value;
    }
}
