"""Verification: sound bounds, exact solvers and certified robustness of neural networks.

* :mod:`robustdl.verify.bounds` -- interval bound propagation (IBP), CROWN and CROWN-IBP, certified accuracy,
  over the bound operators of :mod:`robustdl.verify.operators` (dense rows, or local windows:
  :mod:`robustdl.verify.patches`);
* :mod:`robustdl.verify.milp` -- the exact worst-case margin of a small ReLU network (MILP);
* :mod:`robustdl.verify.deepgo` -- Lipschitz global optimisation with converging bounds (DeepGO);
* :mod:`robustdl.verify.smoothing` -- randomised smoothing: certified L2 radii by sampling;
* :mod:`robustdl.verify.clever` -- CLEVER scores (extreme value theory);
* :mod:`robustdl.verify.splitting` -- adaptive multi-level splitting for rare violations;
* :mod:`robustdl.verify.coverage`, :mod:`robustdl.verify.testgen` -- coverage criteria and test generation.

Reliability assessment lives in :mod:`robustdl.reliability`.
"""

from robustdl.verify.bounds import (
    certified,
    certified_accuracy,
    crown_bounds,
    crown_ibp_margin,
    crown_margin,
    ibp_margin,
    interval_bounds,
    margin_spec,
    preactivation_bounds,
)
from robustdl.verify.milp import MarginResult, exact_margin, exact_min_margin
from robustdl.verify.operators import BoundOp, layers, operators

# One line per module: each module appends its own names.
__all__ = ["certified", "certified_accuracy", "crown_bounds", "crown_ibp_margin", "crown_margin", "ibp_margin",
           "interval_bounds", "margin_spec", "preactivation_bounds"]
__all__ += ["MarginResult", "exact_margin", "exact_min_margin"]
__all__ += ["BoundOp", "layers", "operators"]

from robustdl.verify.clever import clever  # noqa: E402
from robustdl.verify.deepgo import Bounds, SafetyResult, minimise, reachability, safety  # noqa: E402
from robustdl.verify.splitting import MonteCarloResult, SplittingResult, multilevel_splitting, naive_monte_carlo  # noqa: E402

__all__ += ["clever"]
__all__ += ["Bounds", "SafetyResult", "minimise", "reachability", "safety"]
__all__ += ["MonteCarloResult", "SplittingResult", "multilevel_splitting", "naive_monte_carlo"]

from robustdl.verify.coverage import (  # noqa: E402
    ActivationProfile,
    Coverage,
    activation_profile,
    boundary_coverage,
    kmultisection_coverage,
    neuron_coverage,
    sign_sign_coverage,
)
from robustdl.verify.testgen import TestReport, generate_tests  # noqa: E402

__all__ += ["ActivationProfile", "Coverage", "activation_profile", "boundary_coverage", "kmultisection_coverage",
            "neuron_coverage", "sign_sign_coverage"]
__all__ += ["TestReport", "generate_tests"]

from robustdl.verify.smoothing import (  # noqa: E402
    Certificate,
    binomial_test_half,
    certified_radius,
    certify,
    class_counts,
    clopper_pearson_lower,
    smoothed_certified_accuracy,
    smoothed_predict,
)

__all__ += ["Certificate", "binomial_test_half", "certified_radius", "certify", "class_counts", "clopper_pearson_lower",
            "smoothed_certified_accuracy", "smoothed_predict"]
