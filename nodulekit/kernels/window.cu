// window.cu: the input pipeline in one pass: flip + rotate + HU window, image and mask.
//
// What it computes (ops.py, window_augment): for output pixel (y, x) of sample n with
// aug[n] = (flip_h, flip_v, angle_deg), the inverse map
//     t = angle * pi / 180;  dy, dx = y - cy, x - cx;  (cy, cx) = ((H-1)/2, (W-1)/2)
//     sy = cy + cos(t) dy + sin(t) dx;   sx = cx + cos(t) dx - sin(t) dy
//     if flip_v: sy = H - 1 - sy;        if flip_h: sx = W - 1 - sx
// then the image samples int16 HU bilinearly at (sy, sx), a neighbour off the slice being
// air (-1000 HU), and windows it: clip((hu - (center - width/2)) / width, 0, 1) -> float32;
// the mask takes its nearest pixel, floor(s + 0.5) per axis, 0 off the slice, nonzero -> 1.
//
// Precision: the source coordinates (sy, sx), their floors and the mask's rounding run in
// float64, in the CPU backend's order of operations, with __dmul_rn / __dadd_rn so that
// nvcc does not fuse them into FMAs: the mask matches the CPU backend exactly, except where
// CUDA's cos/sin and the host's differ in the last bit and that moves a pixel across an
// exact .5 tie (rare; 90-degree turns hit ties on whole rows, and still agree unless cos
// of pi/2 differs). The bilinear weights and the window then run in float32 (the HU values
// are exact in float32): the image is within a few float32 ulps of the CPU's float64
// result. That split keeps the kernel memory-bound: an H100 does float64 at half the float32
// rate and conversions at 16 per clock per SM, and an all-float64 version would need about
// as long for its arithmetic (~60 FP64 operations a pixel) as for its bytes.
//
// Launch: grid (ceil(W / 256), H, N), block min(256, W rounded up to 32): one thread per
// output pixel, a block per piece of one output row of one sample; thread 0 computes cos/sin
// of the sample's angle (float64) into shared memory once per block.
//
// Napkin math (paper batch: 12 x 512 x 512): reads HU (2 B) and the mask (1 B) per pixel,
// writes the image (4 B) and the mask (1 B): 8 B x 3.1 M = 25 MB, about 8 us at 3 TB/s (the
// four bilinear neighbours of a warp lie in two rows of ~33 pixels: L1 hits). Per pixel
// ~16 FP64 and ~15 FP32 operations and ~8 conversions. Memory-bound: the target is >= 80%
// of the device-to-device copy bandwidth. The raw int16 crosses PCIe, half the bytes of
// float32.
//
// Check: pytest -m gpu tests/test_ops.py -k window   (GPU: vs reference.py, torch)
//        pytest tests/test_ops.py -k "window and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

#define PI_F64 3.141592653589793

__device__ __forceinline__ float hu_at(const short* __restrict__ hu, int H, int W, int yy,
                                       int xx, float air) {
    return (yy >= 0 && yy < H && xx >= 0 && xx < W) ? (float)hu[yy * W + xx] : air;
}

extern "C" __global__ void window_augment(const short* __restrict__ hu,
                                          const unsigned char* __restrict__ mask,
                                          const float* __restrict__ aug, double center,
                                          double width, double air, float* __restrict__ image,
                                          unsigned char* __restrict__ mask_out, int H, int W) {
    __shared__ double rot[2];  // cos t, sin t of this block's sample
    const int n = blockIdx.z, y = blockIdx.y;
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    if (threadIdx.x == 0) {
        const double t = (double)aug[3 * n + 2] * PI_F64 / 180.0;
        rot[0] = cos(t);
        rot[1] = sin(t);
    }
    __syncthreads();
    if (x >= W) return;  // after the block's only barrier

    // source coordinates, float64
    const double ct = rot[0], st = rot[1];
    const bool flip_h = aug[3 * n + 0] != 0.0f, flip_v = aug[3 * n + 1] != 0.0f;
    const double cy = (H - 1) / 2.0, cx = (W - 1) / 2.0;
    const double dy = y - cy, dx = x - cx;
    double sy = __dadd_rn(__dadd_rn(cy, __dmul_rn(ct, dy)), __dmul_rn(st, dx));
    double sx = __dsub_rn(__dadd_rn(cx, __dmul_rn(ct, dx)), __dmul_rn(st, dy));
    if (flip_v) sy = (H - 1) - sy;
    if (flip_h) sx = (W - 1) - sx;
    const double y0 = floor(sy), x0 = floor(sx);
    const int iy = (int)y0, ix = (int)x0;

    const long long base = (long long)n * H * W;
    const short* slice = hu + base;

    // image: bilinear over the four neighbours (air outside), then the window; float32
    const float fy = (float)(sy - y0), fx = (float)(sx - x0), a = (float)air;
    const float top = (1.0f - fx) * hu_at(slice, H, W, iy, ix, a) +
                      fx * hu_at(slice, H, W, iy, ix + 1, a);
    const float bottom = (1.0f - fx) * hu_at(slice, H, W, iy + 1, ix, a) +
                         fx * hu_at(slice, H, W, iy + 1, ix + 1, a);
    const float v = (1.0f - fy) * top + fy * bottom;
    const float lo = (float)(center - width / 2.0);
    float val = (v - lo) / (float)width;
    val = val < 0.0f ? 0.0f : (val > 1.0f ? 1.0f : val);
    const long long o = base + (long long)y * W + x;
    image[o] = val;

    // mask: nearest pixel, 0 outside; float64 rounding as the CPU's
    const int my = (int)floor(__dadd_rn(sy, 0.5)), mx = (int)floor(__dadd_rn(sx, 0.5));
    const bool on = my >= 0 && my < H && mx >= 0 && mx < W && mask[base + my * W + mx] != 0;
    mask_out[o] = on ? 1 : 0;
}
