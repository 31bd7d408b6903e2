"""What the verdict (models/verdict.py) knows of each aten op and of each tensor, without torch: the allow-list, why
the ops outside it are refused, and the records the dispatch mode keeps of activations and constants.

Torch-free, so that models/verdict.py can import it and torch is still imported only when a module is judged.
"""

from __future__ import annotations

# ---- the allow-list: aten op names (overload packets) and what the checker knows of each -------------------------

NEUTRAL = {"clone", "_to_copy", "detach", "alias", "lift_fresh", "lift_fresh_copy", "_conj", "resolve_conj",
           "resolve_neg"}  # copies, dtype/device/memory-format changes: the same values at the same positions
UNARY = {"relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh",
         "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "celu_", "selu", "selu_", "clamp",
         "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "hardswish", "hardswish_", "hardsigmoid",
         "hardsigmoid_", "mish", "mish_", "softplus", "threshold", "threshold_", "abs", "abs_", "neg", "neg_", "exp",
         "exp_", "log", "log_", "sqrt", "sqrt_", "rsqrt", "rsqrt_", "square", "pow", "pow_", "reciprocal",
         "reciprocal_", "sign", "erf", "logical_not"}
BINARY = {"add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "maximum", "minimum", "where", "lerp",
          "lerp_", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "gt", "ge", "lt", "le", "eq", "ne", "logical_and",
          "logical_or", "masked_fill", "masked_fill_"}
POINTWISE = UNARY | BINARY  # one position at a time; constants must be scalars, per channel, or random masks
VIEWS = {"view", "_unsafe_view", "reshape", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "flatten",
         "unflatten"}
PERMUTES = {"permute", "transpose", "transpose_", "t", "t_"}
CONVS = {"convolution", "_convolution"}
NORMS = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
         "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm", "native_group_norm"}
POOLS = {"max_pool2d_with_indices", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
         "adaptive_max_pool2d", "mkldnn_max_pool2d"}
REDUCTIONS = {"mean", "sum", "amax", "amin"}  # only over the whole map: global pooling
SOFTMAX = {"_log_softmax", "_softmax"}
DROPOUT = {"native_dropout"}
PADS = {"constant_pad_nd", "reflection_pad2d", "replication_pad2d"}
KNOWN = NEUTRAL | POINTWISE | VIEWS | PERMUTES | CONVS | NORMS | POOLS | REDUCTIONS | SOFTMAX | DROPOUT | PADS | {
    "slice", "cat"}
RESTRIDES = {"as_strided", "as_strided_"}  # allowed only where the result holds the same values at the same places
# Ops that only read an activation's shape, dtype and device: what they make is a constant, not an activation.
SHAPE_ONLY = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
              "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided"}
UNIFORM = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full", "zeros", "ones", "full",
           "scalar_tensor", "fill_", "zero_"}  # make one value everywhere: a scalar in effect
KEEPS_UNIFORM = NEUTRAL | POINTWISE | VIEWS | PERMUTES | {"expand", "slice", "select", "repeat"}
RANDOM = {"bernoulli", "bernoulli_", "random_", "uniform_", "normal_", "normal", "exponential_", "geometric_",
          "cauchy_", "log_normal_", "rand", "randn", "randint", "randperm", "rand_like", "randn_like",
          "randint_like", "multinomial", "poisson"}

# Why the ops most often met outside the allow-list are refused (anything else gets the general sentence).
_MATRIX = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear", "_trilinear",
           "bilinear", "einsum", "tensordot", "inner", "outer", "ger", "addr", "_addmm_activation", "chain_matmul",
           "linalg_multi_dot", "_int_mm", "_scaled_mm", "mkldnn_linear", "_mkldnn_linear"}
_INDEXING = {"embedding", "embedding_bag", "_embedding_bag", "gather", "index_select", "index", "_unsafe_index",
             "take", "take_along_dim", "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce",
             "index_put", "index_put_", "_index_put_impl_", "index_add", "index_add_", "index_copy", "masked_select",
             "masked_scatter", "nonzero", "grid_sampler_2d", "grid_sampler", "cudnn_grid_sampler", "select",
             "as_strided", "as_strided_", "expand", "repeat", "roll", "flip", "rot90", "narrow", "split",
             "split_with_sizes", "unbind", "chunk", "stack", "diagonal", "tril", "triu"}
_MIXING = {"sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "cumsum", "cumsum_", "cumprod",
           "cummax", "cummin", "logcumsumexp", "_fft_r2c", "_fft_c2c", "_fft_c2r", "max", "min", "std", "var",
           "var_mean", "std_mean", "logsumexp", "prod", "norm", "linalg_vector_norm", "native_layer_norm",
           "_native_multi_head_attention", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math", "_prelu_kernel"}
_GROWING = {"upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_nearest_exact2d",
            "_upsample_bilinear2d_aa", "pixel_shuffle", "pixel_unshuffle", "col2im", "fold"}
NOTES = {"im2col": "unfold", "unfold": "Tensor.unfold", "mm": "matmul", "_trilinear": "bilinear",
         "_local_scalar_dense": ".item() or a branch on a tensor", "grid_sampler_2d": "grid_sample",
         "_fft_r2c": "fft", "_fft_c2c": "fft", "constant_pad_nd": "F.pad", "native_layer_norm": "layer_norm"}
WHY_UNKNOWN = ("not a known local operation (docs/verdict.md lists the ones the checker has judged), so a fully "
                "connected layer cannot be ruled out")


def why_refused(name: str) -> str:
    """Why the op `name`, not in the allow-list, is refused: the ops most often met are told apart."""
    if name in ("im2col", "unfold"):
        return ("not a known local operation: unfold copies each window's pixels into channels, so a 1x1 conv after "
                "it sees the whole window with a weight per pixel, a fully connected layer")
    if name in _MATRIX:
        return "a matrix product on activations: each output sums every input feature with its own weight, a fully " \
               "connected layer"
    if name in _INDEXING:
        return ("not a known local operation: indexing, slicing or striding activations can move any position "
                "anywhere, so weights after it can be weights per pixel, a fully connected layer")
    if name in _MIXING:
        return ("not a known local operation: it mixes positions or channels in ways the checker has not judged "
                "(a sort, a cumulative sum, a transform, attention, a norm over the map), so a fully connected layer "
                "cannot be ruled out")
    if name in _GROWING:
        return ("not a known local operation: it moves pixels into new positions or channels, so a kernel after it "
                "could span every pixel while looking smaller than its map, a fully connected layer in disguise")
    if name == "_local_scalar_dense":
        return ("reads activations back into Python: what is computed from the number escapes the checker, so a "
                "fully connected layer cannot be ruled out")
    if name in ("copy_", "fill_", "zero_", "set_", "resize_", "resize_as_"):
        return ("writes into a tensor in place in a way the checker does not follow, so a fully connected layer "
                "cannot be ruled out")
    return WHY_UNKNOWN


# ---- what the checker knows of each tensor ---------------------------------------------------------------------

class Act:
    """An activation: computed from the input. `real`: for a 4-D map, the (height, width) that holds pixels (less
    than its shape after an explicit pad); `state`: "ok", "aux" (a by-product: batch statistics, pool indices, a
    dropout mask) or "tainted" (computed by a refused op; judged no further)."""

    __slots__ = ("real", "state")

    def __init__(self, real=None, state="ok"):
        self.real, self.state = real, state


class Const:
    """Not computed from the input. `sources`: keys of the tensors from outside the forward it is computed from
    (parameters, buffers, tensors in lists or closures); `random`: made by a random op (a mask); `uniform`: one value
    everywhere (zeros, ones, full): a scalar in effect."""

    __slots__ = ("sources", "random", "uniform")

    def __init__(self, sources=frozenset(), random=False, uniform=False):
        self.sources, self.random, self.uniform = sources, random, uniform


def storage_key(t):
    """Which memory holds the values: views and `.data` aliases of one tensor share it, so they are one weight."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # no storage (a wrapper, a sparse tensor)
        ptr = 0
    return (t.device.type, t.device.index, ptr) if ptr else ("id", id(t))


def storage_size(t) -> int:
    try:
        return t.untyped_storage().nbytes() // max(t.element_size(), 1)
    except Exception:
        return t.numel()


def shape_text(t) -> str:
    """A tensor's shape as the refusals print it: (2, 3), and (3,) for one dim."""
    return "(" + ", ".join(str(int(s)) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"

