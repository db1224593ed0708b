"""The tune stage: Ray Tune over ``prior_loss_weight`` x learning rate, ranked by validation.

``stage.py`` is the Ray Tune driver (the package's only Ray code); ``results.py`` derives each
trial's config and builds the results table and plot.
"""

from raydb.tune.results import RESULT_COLUMNS, trial_config
from raydb.tune.stage import TuneFailed, run_tune, tune_uri

__all__ = ["run_tune", "tune_uri", "trial_config", "RESULT_COLUMNS", "TuneFailed"]
