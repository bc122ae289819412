"""defuse: classify surface-defect images by fusing the embeddings of fine-tuned CNNs."""

__version__ = "0.1.0"
