"""dlforge-edge: run a dlforge model bundle with ONNX Runtime, NumPy and Pillow only (no torch, no dlforge).

    from dlforge_edge import EdgeModel, load_bundle

    model = EdgeModel(load_bundle("bundle.zip"))       # BundleError if it was altered or is of another version
    decision = model.predict(open("cell.png", "rb").read())
    decision.label, decision.probabilities
"""

from dlforge_edge.bundle import FORMAT_VERSION, Bundle, BundleError, Preprocessing, load_bundle
from dlforge_edge.model import Decision, EdgeModel, ImageRejected

__all__ = ["FORMAT_VERSION", "Bundle", "BundleError", "Decision", "EdgeModel", "ImageRejected", "Preprocessing",
           "load_bundle"]
