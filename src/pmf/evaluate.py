"""Former location of the evaluation API, kept so existing scripts keep working: statistics moved to
:mod:`pmf.eval.stats`, generation and the metric driver to :mod:`pmf.eval.generate`."""

from pmf.eval.generate import (  # noqa: F401
    Metric,
    class_balanced_labels,
    compute_stats,
    evaluate_generator,
    generate,
    reference_stats,
)
from pmf.eval.metrics import setup_metric  # noqa: F401
from pmf.eval.stats import (  # noqa: F401
    ClassSpread,
    FeatureStats,
    InceptionScoreStats,
    frechet_distance,
    load_ref_stats,
    save_ref_stats,
)
