"""trec-rank: recommender ranking on TorchRec."""
