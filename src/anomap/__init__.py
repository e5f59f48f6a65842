"""anomap: unsupervised visual anomaly detection and localization."""

__version__ = "0.1.0"

from anomap.run import Detector, Prediction  # noqa: E402

__all__ = ["Detector", "Prediction", "__version__"]
