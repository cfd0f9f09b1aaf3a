// The estimators and imputation losses the fused loss kernels implement, by the names of the
// Python registry (estimators/registry.py).  This is the extension's one list of them: the
// schema's string arguments are parsed against it (dr_loss.cpp) and the Python module
// exports it (cvr.cpp: estimators._C.prediction_kernels / imputation_kernels), so the registry
// sends an entry to the kernels exactly when its name is here and to the pure-PyTorch
// reference otherwise.  The order is that of the enums in dr_loss.h.
#pragma once

#include <array>
#include <string_view>

namespace cvr::ops {

inline constexpr std::array<std::string_view, 5> kPredictionKernels{"naive", "ips", "snips", "dr", "badr"};
inline constexpr std::array<std::string_view, 6> kImputationKernels{"dr", "mrdr", "dr_bias", "dr_mse", "badr",
                                                                    "badr_paper"};

}  // namespace cvr::ops
