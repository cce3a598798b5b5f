// Schema of attnscale::winograd_conv2d: a 3x3, stride-1 convolution with zero padding (Caffe Convolution
// with kernel_size 3, pad p, dilation d: every DeepLab trunk layer conv1_1 .. conv5_3 and the attention
// head's 3x3 layer) computed with Winograd's minimal filtering F(2x2, 3x3) or F(4x4, 3x3).
//
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A   per 2x2 output tile, 4x4 input tile d
//
// The weight transform U = G g G^T (16, out, in), G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1], is
// its own op, winograd_weight, and an argument of the convolution, so that a caller transforms each
// weight once (the three scales of a share-net share it).  The convolution also takes the weight
// itself: its kernel reads only U, but its gradient is the convolution's, which needs the weight.
// The input transform and the output transform are the CPU kernel's loops; the 16 products
// U_ij V_ij are one batched GEMM (at::bmm: MKL on the CPU wheels), over bands of tile rows so that
// the transformed tiles stay in cache.  CPU only: on CUDA, cuDNN already picks Winograd kernels.
// The autograd formula (attnscale/ops/winograd_conv.py) is the convolution's: d/dx is itself a 3x3
// convolution (flipped, transposed weight) and runs through this op, d/dweight through oneDNN.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("winograd_weight(Tensor weight, int tile=2) -> Tensor");
  // relu: the ReLU that follows every such layer in DeepLab, fused into the output transform; dilation d
  // (padding d q): the d x d polyphase components, each an undilated convolution with padding q (conv5)
  m.def(
      "winograd_conv2d(Tensor x, Tensor weight, Tensor weight_winograd, Tensor? bias=None, int padding=1, "
      "bool relu=False, int dilation=1) -> Tensor");
}
