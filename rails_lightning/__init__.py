"""rails_lightning: retrieval with learned similarities on PyTorch Lightning."""

__version__ = "0.1.0"
