from rails_lightning.models.encoders import MeanPoolEncoder, QueryEncoder, SASRecEncoder, UserIdEncoder
from rails_lightning.models.hstu import HSTUEncoder
from rails_lightning.models.retrieval_module import RetrievalModule

__all__ = ["RetrievalModule", "QueryEncoder", "SASRecEncoder", "HSTUEncoder", "MeanPoolEncoder", "UserIdEncoder"]
