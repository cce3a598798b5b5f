// The memory layout the layout-following kernels work in and give their outputs in.
#pragma once

#include <ATen/ATen.h>

namespace attnscale {

// channels_last when t suggests it (a channels_last tensor from cuDNN's convolutions), else NCHW.
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

}  // namespace attnscale
