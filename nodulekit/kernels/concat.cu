// concat.cu: copy a block of channels between two NHWC buffers (concat and split).
//
// What it computes: for every pixel p < P and channel c < C,
//     dst[p * dst_ld + dst_off + c] = src[p * src_ld + src_off + c]
// where ld is a buffer's channel count (its row length) and off the first channel copied.
//   concat_channels(a, b) -> y:  copy a into y[..., :Ca], then b into y[..., Ca:]
//   split_channels(dy, Ca):      copy dy[..., :Ca] into da, then dy[..., Ca:] into db
// The same kernel puts a skip connection into its half of a concat buffer whose other half
// the up-convolution writes directly (cuda.py: upconv2x2_concat_forward).
//
// Launch: 1-D grid-stride over P*C elements, 256 threads, about 32 blocks per SM; 32-bit
// unsigned indices (cuda.py refuses arrays of 2^31 elements or more).
//   copy_channels       one float per iteration (any C, ld, off)
//   copy_channels_vec4  four channels as one float4 (C, ld and off multiples of 4, both
//                       buffers 16-byte aligned: every U-Net level with width % 4 == 0)
//
// Napkin math (paper shape, decoder level 0: 12 x 512 x 512, 64 + 64 channels): a concat
// reads 2 x 12*512*512*64*4 B = 2 x 805 MB and writes 1.6 GB: 3.2 GB of traffic, about
// 1.1 ms at 3 TB/s. No arithmetic but the index: (p, c) = divmod(i, C).
// Memory-bound: the target is >= 80% of the device-to-device copy bandwidth.
//
// Check: pytest -m gpu tests/test_ops.py -k "concat or split"   (GPU)
//        pytest tests/test_ops.py -k "(concat or split) and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

// dst[p * dst_ld + dst_off + c] = src[p * src_ld + src_off + c], grid-stride over P x C;
// T = float, or float4 with every count and offset in units of four channels
template <typename T>
__device__ __forceinline__ void copy_channel_block(const T* __restrict__ src, int src_ld,
                                                   int src_off, T* __restrict__ dst, int dst_ld,
                                                   int dst_off, int P, int C) {
    const unsigned total = (unsigned)P * C;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const unsigned p = i / C;
        const unsigned c = i - p * C;
        dst[p * dst_ld + dst_off + c] = src[p * src_ld + src_off + c];
    }
}

extern "C" __global__ void copy_channels(const float* __restrict__ src, int src_ld, int src_off,
                                         float* __restrict__ dst, int dst_ld, int dst_off,
                                         int P, int C) {
    copy_channel_block(src, src_ld, src_off, dst, dst_ld, dst_off, P, C);
}

extern "C" __global__ void copy_channels_vec4(const float* __restrict__ src, int src_ld,
                                              int src_off, float* __restrict__ dst, int dst_ld,
                                              int dst_off, int P, int C) {
    copy_channel_block(reinterpret_cast<const float4*>(src), src_ld / 4, src_off / 4,
                       reinterpret_cast<float4*>(dst), dst_ld / 4, dst_off / 4, P, C / 4);
}
