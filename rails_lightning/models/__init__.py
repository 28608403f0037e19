from rails_lightning.models.encoders import MeanPoolEncoder, QueryEncoder, SASRecEncoder, UserIdEncoder
from rails_lightning.models.hstu import HSTUEncoder
from rails_lightning.models.retrieval_module import RetrievalModule
from rails_lightning.models.text_queries import GRUOverTokens, MeanPooledTokens, PretrainedSentenceQueries

__all__ = [
    "RetrievalModule", "QueryEncoder", "SASRecEncoder", "HSTUEncoder", "MeanPoolEncoder", "UserIdEncoder",
    "MeanPooledTokens", "GRUOverTokens", "PretrainedSentenceQueries",
]
