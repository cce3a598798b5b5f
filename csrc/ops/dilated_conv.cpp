// Schema of attnscale::dilated_conv2d and its backward ops.
//
// dilated_conv2d is Caffe's Convolution layer with stride 1, `dilation: d`,
// `pad: p` and zero padding (DeepLab-LargeFOV fc6: 3x3, d=12, p=12).  The
// kernels (csrc/ops/cpu/dilated_conv_kernel.cpp, csrc/ops/cuda/*, and the GEMM
// path of every device, csrc/ops/dilated_conv_gemm.cpp) skip the taps that
// read padding.  Autograd is registered in Python
// (attnscale/ops/dilated_conv.py) on top of the two backward ops:
//   dilated_conv2d_backward_input : grad_x (input size follows from grad_output
//       and the kernel: H = Ho - 2p + d*(KH-1))
//   dilated_conv2d_backward_weight: (grad_weight, grad_bias); `columns`, the column blocks of x that
//       dilated_conv2d_with_columns kept, spares the GEMM path packing them again (the direct kernels
//       ignore them)
// dilated_conv2d_with_columns is the forward on the GEMM path (every device) that also returns those
// blocks (1-D; their layout: attnscale._C.dilated_conv_column_groups): training's forward when the weight
// needs a gradient.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("dilated_conv2d(Tensor x, Tensor weight, Tensor? bias=None, int dilation=12, int padding=12) -> Tensor");
  m.def("dilated_conv2d_backward_input(Tensor grad_output, Tensor weight, int dilation, int padding) -> Tensor");
  m.def("dilated_conv2d_with_columns(Tensor x, Tensor weight, Tensor? bias=None, int dilation=12, "
        "int padding=12) -> (Tensor, Tensor)");
  m.def("dilated_conv2d_backward_weight(Tensor grad_output, Tensor x, int kernel_h, int kernel_w, "
        "int dilation, int padding, Tensor? columns=None) -> (Tensor, Tensor)");
}
