"""Analysis of activation stores, over stores or in-memory arrays.

- `compare_stores(real, generated, layer, …)` (`compare.compare(compare_options(…))` underneath), `compare_to_reference(store, ref.npz, layer, …)`: FD, KID,
  precision/recall/density/coverage, Inception Score; report on dimension `label` (`open_report` reads any report).
- `statistics(store, layer=…, output=…)`, `layer_statistics`, `read_reference`, `write_reference`: reference
  statistics (`mu`, `sigma`) as pytorch-fid and EDM write them; per-class statistics stores.
- `frechet_distance`, `kid`, `inception_score`, `prdc`: the metrics on arrays (formulas and sources in each module).
"""

from extractor.analysis.compare import compare_options, compare_stores, compare_to_reference, open_report
from extractor.analysis.inception_scoring import InceptionScore, inception_score
from extractor.analysis.kernel_inception_distance import KID, kid, mmd2_unbiased, polynomial_kernel
from extractor.analysis.metrics import PRDC, GaussianAccumulator, frechet_distance, frechet_distance_from_samples, prdc
from extractor.analysis.reference_statistics import (
    LayerStatistics,
    ReferenceStatistics,
    layer_statistics,
    read_reference,
    statistics,
    statistics_from_features,
    store_inception_score,
    write_reference,
)

__all__ = [
    "KID", "PRDC", "GaussianAccumulator", "InceptionScore", "LayerStatistics", "ReferenceStatistics",
    "compare_options", "compare_stores", "compare_to_reference", "frechet_distance", "frechet_distance_from_samples",
    "inception_score", "kid", "layer_statistics", "mmd2_unbiased", "open_report", "polynomial_kernel", "prdc",
    "read_reference", "statistics", "statistics_from_features", "store_inception_score", "write_reference",
]  # fmt: skip
