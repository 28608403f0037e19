from rails_lightning.callbacks.corpus_evaluation import CorpusEvaluation

__all__ = ["CorpusEvaluation"]
