// ImageNet preprocessing: a batch of uint8 BGR HWC images of any sizes → NCHW RGB (x/255 - mean)/std
// (float or half), as torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize: the resize and
// the crop are fused, each output pixel samples the resized image bilinearly (half-pixel centres,
// edges clamped; no antialiasing, so strong downscales differ from PIL's a little).
#include "common.cuh"

#define MAX_IMAGES 64

struct ClsImage {
    const unsigned char* src;
    int h, w, pitch;        // source size; pitch: bytes per source row
    int left, top;          // crop offset inside the resized image
    float scale_x, scale_y;  // source pixels per resized pixel
};

struct ClsBatch {
    ClsImage image[MAX_IMAGES];
    void* out;  // [N, 3, out_h, out_w]
    int first;  // batch index of image[0]
    int out_h, out_w, half;
    float mean[3], std[3];  // RGB order
};

__device__ __forceinline__ void source_taps(int d, float scale, int size, int* i0, int* i1, float* f) {
    float s = ((float)d + 0.5f) * scale - 0.5f;
    s = fminf(fmaxf(s, 0.0f), (float)(size - 1));
    const int i = (int)floorf(s);
    *i0 = i;
    *i1 = min(i + 1, size - 1);
    *f = s - (float)i;
}

// One thread per output pixel (all 3 channels); block (32, 8), grid (ceil(out_w/32), ceil(out_h/8), images).
extern "C" __global__ void imagenet(ClsBatch batch) {
    const ClsImage& im = batch.image[blockIdx.z];
    const int ox = blockIdx.x * blockDim.x + threadIdx.x, oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= batch.out_w || oy >= batch.out_h) return;
    int x0, x1, y0, y1;
    float fx, fy;
    source_taps(ox + im.left, im.scale_x, im.w, &x0, &x1, &fx);
    source_taps(oy + im.top, im.scale_y, im.h, &y0, &y1, &fy);
    const unsigned char* row0 = im.src + (long long)y0 * im.pitch;
    const unsigned char* row1 = im.src + (long long)y1 * im.pitch;
    const long long plane = (long long)batch.out_h * batch.out_w;
    const long long at = (long long)(batch.first + blockIdx.z) * 3 * plane + (long long)oy * batch.out_w + ox;
    for (int c = 0; c < 3; ++c) {  // output channel c is RGB: source channel 2 - c
        const int s = 2 - c;
        const float top = (float)row0[3 * x0 + s] * (1.0f - fx) + (float)row0[3 * x1 + s] * fx;
        const float bottom = (float)row1[3 * x0 + s] * (1.0f - fx) + (float)row1[3 * x1 + s] * fx;
        const float pixel = top * (1.0f - fy) + bottom * fy;
        const float value = (pixel / 255.0f - batch.mean[c]) / batch.std[c];
        if (batch.half) ((unsigned short*)batch.out)[at + c * plane] = float_to_half(value);
        else ((float*)batch.out)[at + c * plane] = value;
    }
}
