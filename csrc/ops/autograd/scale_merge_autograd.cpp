// Autograd kernel of attnscale::scale_merge (torchvision's csrc/ops/autograd layout).
//
// Why C++ and not torch.library.register_autograd: at the training shape (N=10, 41/31/21 maps)
// the two kernels take well under a millisecond, and the Python autograd wrapper that
// register_autograd installs (pytree flattening of the Tensor[] argument, a Python
// autograd.Function per call) cost ~0.3 ms on top, measured by benchmarks/bench_merge.py.  This
// kernel does the same bookkeeping in C++.  It saves the inputs and, for attention, the weights output
// (N, S, H0, W0: the CUDA backward reads the float32 softmax from it instead of recomputing it; the
// resized maps are recomputed, nothing of size N*C*H0*W0 is kept) and calls the registered
// backward op, scale_merge_backward, whose own autograd formula (registered from Python in
// attnscale/ops/scale_merge.py) raises the clear "double backward is not supported" error.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace attnscale {
namespace scale_merge {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(at::TensorList scores, const std::optional<at::Tensor>& logits,
                                                c10::string_view mode) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attnscale::scale_merge", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, const std::optional<at::Tensor>&,
                                                                 c10::string_view)>();
  return op.call(scores, logits, mode);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> call_backward(const at::Tensor& grad_merged,
                                                              const std::optional<at::Tensor>& grad_weights,
                                                              at::TensorList scores,
                                                              const std::optional<at::Tensor>& logits,
                                                              c10::string_view mode,
                                                              const std::optional<at::Tensor>& weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attnscale::scale_merge_backward", "")
                       .typed<std::tuple<std::vector<at::Tensor>, at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, at::TensorList,
                           const std::optional<at::Tensor>&, c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(grad_merged, grad_weights, scores, logits, mode, weights);
}

class ScaleMergeFunction : public torch::autograd::Function<ScaleMergeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList scores, const std::optional<at::Tensor>& logits,
                               c10::string_view mode) {
    const bool attention = mode == "attention";
    const bool has_logits = attention && logits.has_value() && logits->defined();
    at::Tensor merged, weights;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(merged, weights) = call_forward(scores, logits, mode);
    }
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["num_scales"] = static_cast<int64_t>(scores.size());
    ctx->saved_data["has_logits"] = has_logits;
    // an unused output gets an undefined gradient instead of a materialised zero tensor
    ctx->set_materialize_grads(false);
    variable_list saved(scores.begin(), scores.end());
    if (has_logits) {
      saved.push_back(*logits);
      saved.push_back(weights);  // an output: saved as one (no reference cycle)
    }
    ctx->save_for_backward(saved);
    return {merged, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const int64_t S = ctx->saved_data["num_scales"].toInt();
    const bool has_logits = ctx->saved_data["has_logits"].toBool();
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<at::Tensor> scores(saved.begin(), saved.begin() + S);
    const std::optional<at::Tensor> logits = has_logits ? std::optional<at::Tensor>(saved[S]) : std::nullopt;
    const std::optional<at::Tensor> weights = has_logits ? std::optional<at::Tensor>(saved[S + 1]) : std::nullopt;
    const bool attention = mode == "attention";

    at::Tensor grad_merged = grad_outputs[0];
    // avg: constant weights; max: piecewise-constant counts -> the weights carry no gradient
    const at::Tensor grad_weights = attention ? grad_outputs[1] : at::Tensor();
    // one gradient per forward input: the S score maps, logits, mode
    variable_list result(S + 2);
    if (!grad_merged.defined()) {  // only the weights were used
      if (!grad_weights.defined()) return result;
      grad_merged = at::zeros_like(scores[0]);
    }
    const std::optional<at::Tensor> gw = grad_weights.defined() ? std::optional<at::Tensor>(grad_weights)
                                                                : std::nullopt;
    std::vector<at::Tensor> grads;
    at::Tensor glogits;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: through the autograd key, so that differentiating this backward
      // raises scale_merge_backward's "double backward is not supported" error
      std::tie(grads, glogits) = call_backward(grad_merged, gw, scores, logits, mode, weights);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(grads, glogits) = call_backward(grad_merged, gw, scores, logits, mode, weights);
    }
    for (int64_t s = 0; s < S; ++s) result[s] = grads[s];
    if (attention) result[S] = glogits;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> scale_merge_autograd(at::TensorList scores, const std::optional<at::Tensor>& logits,
                                                        c10::string_view mode) {
  const variable_list out = ScaleMergeFunction::apply(scores, logits, mode);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace scale_merge
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, Autograd, m) {
  m.impl("scale_merge", &attnscale::scale_merge::scale_merge_autograd);
}
