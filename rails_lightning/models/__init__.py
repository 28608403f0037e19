from rails_lightning.models.base import RetrievalModule
from rails_lightning.models.encoders import MeanPoolEncoder, QueryEncoder, SASRecEncoder, UserIdEncoder
from rails_lightning.models.two_tower import TwoTower

__all__ = ["RetrievalModule", "TwoTower", "QueryEncoder", "SASRecEncoder", "MeanPoolEncoder", "UserIdEncoder"]
